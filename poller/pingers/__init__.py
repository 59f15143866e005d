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


def canonical_ipv4(target: str) -> int | None:
    """The address as an integer when `target` is IPv4 text in canonical form (dotted
    quad, no leading zeros or spaces), else None: the C round trip inet_pton/inet_ntop,
    about a microsecond, with no cache to fill (at a million targets a cache would miss and
    cost memory). Nearly every job's target takes this path."""
    try:
        packed = socket.inet_pton(socket.AF_INET, target)
    except (OSError, ValueError, TypeError):
        return None
    return int.from_bytes(packed, "big") if socket.inet_ntop(
        socket.AF_INET, packed) == target else None


def parse_ip(target: str) -> tuple[int, str] | None:
    """(IP version, canonical text) of a target, or None.

    Called for every ping. Canonical IPv4 text (what the scheduler hands over) is returned
    as the same string object; anything else goes through `ipaddress`, cached."""
    if canonical_ipv4(target) is not None:
        return 4, target
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
