"""Probing methods behind one small interface: give an IP and a callback, get one result.

One module per method: `latency_api` (the SpreeDB Latency API over HTTP) and `icmp`
(in-process echo). `submit` starts a ping and calls `done` exactly once, later (never from
inside `submit`), with a classified `PingResult`; a failed ping is a result, not an
exception. A callback rather than a coroutine per ping: the ICMP pinger needs no task per
ping, which is most of its cost. `ping()` awaits one result, for callers that want that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple, Protocol

from ..models import SampleStatus


class PingResult(NamedTuple):  # a tuple: one is made per ping, in C
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


def parse_ip(target: str) -> tuple[int, str] | None:
    """(IP version, canonical text) of a target, or None.

    Called for every ping. An IPv4 address already in canonical form (what the scheduler
    hands over) is checked by the C round trip inet_pton/inet_ntop and returned as the
    same string object, with no cache to fill: at a million targets a cache would miss
    and cost memory. Anything else goes through `ipaddress`, cached."""
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, target)) == target:
            return 4, target
    except (OSError, ValueError, TypeError):
        pass
    return _parse_ip(target)


@lru_cache(maxsize=1 << 14)
def _parse_ip(target: str) -> tuple[int, str] | None:
    try:
        addr = ipaddress.ip_address(target.strip())
    except ValueError:
        return None
    return addr.version, str(addr)


def valid_ip(target: str | None) -> str | None:
    """The normalised address, or None: only a valid IP reaches a URL or a socket."""
    parsed = parse_ip(target) if target else None
    return parsed[1] if parsed else None


def system_error(detail: str) -> PingResult:
    return PingResult(SampleStatus.SYSTEM_ERROR, None, detail)
