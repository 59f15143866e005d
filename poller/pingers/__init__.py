"""Probing methods behind one small interface: give an IP and a callback, get one result.

One module per method: `latency_api` (the SpreeDB Latency API over HTTP) and `icmp`
(in-process echo). `submit` starts a ping and calls `done` exactly once, later (never from
inside `submit`), with a classified `PingResult`; a failed ping is a result, not an
exception. A callback rather than a coroutine per ping: the ICMP pinger needs no task per
ping, which is most of its cost. `ping()` awaits one result, for callers that want that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..models import SampleStatus


@dataclass(frozen=True, slots=True)
class PingResult:
    status: SampleStatus
    rtt_ms: float | None = None
    detail: str = ""  # why it was not a success; for logs and the sidecar, never stored


Done = Callable[[PingResult], None]


class Pinger(Protocol):
    async def start(self) -> None: ...

    def submit(self, ip: str, done: Done) -> None: ...

    async def close(self) -> None: ...


async def ping(pinger: Pinger, ip: str) -> PingResult:
    """Ping once and wait for the result."""
    fut: asyncio.Future[PingResult] = asyncio.get_running_loop().create_future()
    pinger.submit(ip, fut.set_result)
    return await fut


def system_error(detail: str) -> PingResult:
    return PingResult(SampleStatus.SYSTEM_ERROR, None, detail)
