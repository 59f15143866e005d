"""Probing methods behind one small interface: give an IP, get a classified result.

One module per method (latency_api: the SpreeDB Latency API over HTTP). A pinger never
raises for a failed ping: every outcome is a `PingResult` the recorder can store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..models import SampleStatus


@dataclass(frozen=True, slots=True)
class PingResult:
    status: SampleStatus
    rtt_ms: float | None = None
    detail: str = ""  # why it was not a success; for logs only, never stored


class Pinger(Protocol):
    async def start(self) -> None: ...

    async def ping(self, ip: str) -> PingResult: ...

    async def close(self) -> None: ...


def system_error(detail: str) -> PingResult:
    return PingResult(SampleStatus.SYSTEM_ERROR, None, detail)
