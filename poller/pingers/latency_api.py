"""Client of the SpreeDB Latency API (and of our sidecar, which speaks the same API).

Routes: `GET {base}/latency/{group}/{ip}/` → `{elapsed, error, expected, ip, poller}`
(default, as the original service), or `POST {base}/ping {"ip"}` → `{success, rtt_ms, error}`.
One aiohttp session whose connection pool matches CONCURRENCY. The caller (the prober)
bounds pings in flight to the same number, so the per-request timeout covers the request
only, never a wait for a free connection.

Whatever the API answers (invalid UTF-8, JSON nested past the recursion limit, a body of
megabytes, a number too large for any column, a truncated body, a reset), each ping ends
in exactly one classified result: bodies are read up to MAX_BODY_BYTES, and any failure
to read or understand one is a `system_error`.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..models import MAX_RTT_MS, LatencyRoute, SampleStatus
from . import Done, PingResult, system_error, valid_ip

MAX_BODY_BYTES = 64 * 1024  # an answer is ~100 bytes; anything near this is not one

# Error texts that mean "the target did not answer" rather than "the check itself failed".
_MISSED_WORDS = ("timeout", "unreachable", "no reply", "host down")


def classify_error_text(error: str) -> PingResult:
    error = error[:500]
    lowered = error.lower()
    if any(word in lowered for word in _MISSED_WORDS):
        return PingResult(SampleStatus.MISSED, None, error)
    return system_error(error)


def _positive_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) and f > 0 else None


def classify_latency_body(body: Any) -> PingResult:
    """The classification table of the original service for `GET /latency/...` bodies."""
    if not isinstance(body, dict):
        return system_error(f"unexpected response body: {type(body).__name__}")
    error = body.get("error")
    if error:
        return classify_error_text(str(error))
    elapsed = body.get("elapsed")
    if elapsed is not None and (isinstance(elapsed, bool) or not isinstance(elapsed, int | float)):
        return system_error(f"non-numeric elapsed: {str(elapsed)[:100]!r}")
    if elapsed is not None and not (math.isfinite(elapsed) and elapsed <= MAX_RTT_MS):
        return system_error(f"implausible elapsed: {elapsed!r}")
    rtt = _positive_number(elapsed)
    if rtt is not None:
        return PingResult(SampleStatus.SUCCESS, rtt)
    return PingResult(SampleStatus.MISSED, None, "no elapsed time")


def classify_ping_body(body: Any) -> PingResult:
    """The same table for `POST /ping` bodies: `{success, rtt_ms, error}`."""
    if not isinstance(body, dict):
        return system_error(f"unexpected response body: {type(body).__name__}")
    error = body.get("error")
    if error:
        return classify_error_text(str(error))
    raw = body.get("rtt_ms")
    if isinstance(raw, float) and not (math.isfinite(raw) and raw <= MAX_RTT_MS):
        return system_error(f"implausible rtt_ms: {raw!r}")
    rtt = _positive_number(raw)
    if body.get("success") is True and rtt is not None:
        return PingResult(SampleStatus.SUCCESS, rtt)
    return PingResult(SampleStatus.MISSED, None, "no reply")


class LatencyApiPinger:
    def __init__(
        self,
        base_url: str,
        *,
        route: LatencyRoute = "latency",
        group: str = "Sound Check",
        timeout_s: float = 10.0,
        concurrency: int = 50,
    ) -> None:
        self._route = route
        self._group = quote(group, safe="")
        # Request URLs are made from this parsed base and an already-encoded path: yarl
        # parsing and quoting a whole URL string costs 6 us per request (each target's URL
        # differs, so its cache misses), with_path(encoded=True) 1 us.
        base = URL(base_url)
        self._base_url, self._base_path = base.with_path("/"), base.raw_path.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, raise_for_status=False
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def submit(self, ip: str, done: Done) -> None:
        if self._session is None:
            raise RuntimeError("LatencyApiPinger.start() was not called")
        task = asyncio.create_task(self._run(ip, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ip: str, done: Done) -> None:
        addr = valid_ip(ip)
        if addr is None:
            result = system_error(f"invalid target address {ip!r}")
        else:
            try:
                result = await self._request(addr)
            except Exception as exc:  # never leave a ping without its one result
                result = system_error(f"latency API answer not understood: "
                                      f"{exc.__class__.__name__}")
        done(result)

    async def _request(self, addr: str) -> PingResult:
        assert self._session is not None
        try:
            if self._route == "latency":
                # Canonical IPv4 text is digits and dots, nothing to quote; IPv6 has colons.
                ip_path = quote(addr, safe="") if ":" in addr else addr
                url = self._base_url.with_path(
                    f"{self._base_path}/latency/{self._group}/{ip_path}/", encoded=True)
                resp_cm = self._session.get(url)
                classify = classify_latency_body
            else:
                resp_cm = self._session.post(
                    self._base_url.with_path(f"{self._base_path}/ping", encoded=True),
                    json={"ip": addr})
                classify = classify_ping_body
            async with resp_cm as resp:
                if not 200 <= resp.status < 300:
                    return system_error(f"latency API answered HTTP {resp.status}")
                raw = await _read_capped(resp)
        except TimeoutError:
            return system_error("latency API did not answer in time")
        except aiohttp.ClientError as exc:
            return system_error(f"latency API unreachable: {exc.__class__.__name__}")
        if raw is None:
            return system_error(f"latency API sent a body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return system_error("latency API sent a body that is not JSON in UTF-8")
        return classify(body)


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None past MAX_BODY_BYTES (read no further than that)."""
    if resp.content_length is not None:
        if resp.content_length > MAX_BODY_BYTES:
            return None
        # The length is known and small: one read of exactly that (aiohttp stops there),
        # not a chunk iterator per answer.
        return await resp.read()
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
