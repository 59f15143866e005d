"""The Latency API client and the classification table (docs/architecture.md, "Samples"),
against a scripted stand-in served over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import get_args
from uuid import uuid4

import pytest
from aiohttp import web

from poller.localpg import free_port
from poller.metrics import Metrics
from poller.models import Job, LatencyRoute, SampleStatus
from poller.pingers import ping, valid_ip
from poller.pingers.latency_api import (
    LatencyApiPinger,
    classify_latency_body,
    classify_ping_body,
)
from poller.prober import Prober
from poller.recorder import Recorder
from poller.scheduler import JobState
from tests.conftest import STANDIN_RTT_MS
from tests.support import latency_standin as sb
from tests.support.fakes import NullStore
from tests.support.latency_standin import LatencyStandIn

S, M, E = SampleStatus.SUCCESS, SampleStatus.MISSED, SampleStatus.SYSTEM_ERROR


@pytest.mark.parametrize(("body", "status", "rtt"), [
    ({"elapsed": 12.5, "error": None}, S, 12.5),
    ({"elapsed": 3, "error": ""}, S, 3.0),
    ({"elapsed": 0, "error": None}, M, None),
    ({"elapsed": -1, "error": None}, M, None),
    ({"error": None}, M, None),
    ({"elapsed": 0, "error": "Request timeout for icmp_seq 1"}, M, None),
    ({"elapsed": 0, "error": "Destination Host Unreachable"}, M, None),
    ({"elapsed": 0, "error": "No reply from 10.0.0.1"}, M, None),
    ({"elapsed": 0, "error": "sendto: Host down"}, M, None),
    ({"elapsed": 5, "error": "TIMEOUT after 1s"}, M, None),  # an error wins over elapsed
    ({"elapsed": 0, "error": "operation timed out"}, E, None),  # not in the table: as the original
    ({"elapsed": 0, "error": "permission denied"}, E, None),
    ({"elapsed": "12", "error": None}, E, None),
    ({"elapsed": True, "error": None}, E, None),
    ([1, 2], E, None),
    ("ok", E, None),
])
def test_latency_route_table(body: object, status: SampleStatus, rtt: float | None) -> None:
    result = classify_latency_body(body)
    assert (result.status, result.rtt_ms) == (status, rtt)


@pytest.mark.parametrize(("body", "status", "rtt"), [
    ({"success": True, "rtt_ms": 4.2, "error": None}, S, 4.2),
    ({"success": True, "rtt_ms": 0, "error": None}, M, None),
    ({"success": False, "rtt_ms": None, "error": "timeout"}, M, None),
    ({"success": False, "rtt_ms": None, "error": "network unreachable"}, M, None),
    ({"success": False, "rtt_ms": None, "error": "socket: operation not permitted"}, E, None),
    ({"success": False, "rtt_ms": None, "error": None}, M, None),
    (None, E, None),
])
def test_ping_route_table(body: object, status: SampleStatus, rtt: float | None) -> None:
    result = classify_ping_body(body)
    assert (result.status, result.rtt_ms) == (status, rtt)


@pytest.mark.parametrize(("target", "expected"), [
    ("127.0.0.1", "127.0.0.1"), (" 10.1.2.3 ", "10.1.2.3"), ("::1", "::1"),
    ("2001:DB8::1", "2001:db8::1"), ("", None), (None, None), ("example.com", None),
    ("10.0.0.0/24", None), ("127.0.0.1/../../admin", None), ("300.1.1.1", None),
])
def test_only_valid_addresses_pass(target: str | None, expected: str | None) -> None:
    assert valid_ip(target) == expected


# One address per behaviour, each answered as scripted by the stand-in.
CASES = [
    (sb.SUCCESS, S, STANDIN_RTT_MS),
    (sb.TIMEOUT_TEXT, M, None),
    (sb.UNREACHABLE, M, None),
    (sb.NO_REPLY, M, None),
    (sb.HOST_DOWN, M, None),
    (sb.OTHER_ERROR, E, None),
    (sb.ZERO_ELAPSED, M, None),
    (sb.HTTP_500, E, None),
    (sb.HANG, E, None),
    (sb.GARBAGE, E, None),
    *((how, E, None) for how in sb.HOSTILE),
]


@pytest.mark.parametrize("route", get_args(LatencyRoute))
async def test_classification_over_http(standin: LatencyStandIn, route: LatencyRoute) -> None:
    for i, (how, _, _) in enumerate(CASES):
        standin.behaviours[f"127.0.9.{i + 1}"] = how
    pinger = LatencyApiPinger(standin.url, route=route, timeout_s=0.3)
    await pinger.start()
    try:
        results = await asyncio.gather(
            *(ping(pinger, f"127.0.9.{i + 1}") for i in range(len(CASES))))
    finally:
        await pinger.close()
    for (how, status, rtt), result in zip(CASES, results, strict=True):
        assert (result.status, result.rtt_ms) == (status, rtt), how
    for i, (how, _, _) in enumerate(CASES):
        # aiohttp retries a request once when a reused connection drops before an answer.
        tries = (1, 2) if how in (sb.RESET, sb.TRUNCATED) else (1,)
        assert standin.requests[f"127.0.9.{i + 1}"] in tries, how


async def test_hostile_answers_never_hold_a_ping(standin: LatencyStandIn) -> None:
    # Every ping of a poller whose API answers only hostile bodies ends in one result each,
    # so the prober's CONCURRENCY slots are never used up (before: after CONCURRENCY such
    # answers nothing was pinged at all).
    for i, how in enumerate(sb.HOSTILE):
        standin.behaviours[f"127.0.8.{i + 1}"] = how
    metrics = Metrics()
    recorder = Recorder(NullStore(), metrics, batch_size=10_000, flush_interval_s=60,
                        max_buffered=10_000, max_backoff_s=1)
    pinger = LatencyApiPinger(standin.url, concurrency=2, timeout_s=2)
    await pinger.start()
    prober = Prober(pinger, recorder, metrics, concurrency=2, timeout_s=2)
    states = [JobState(Job(uuid4(), f"127.0.8.{i + 1}", 1, 60, datetime.now(UTC)),
                       f"127.0.8.{i + 1}", None, 0) for i in range(len(sb.HOSTILE))]
    for k in range(3):
        for state in states:
            prober.on_slot(state, k, time.time())
    async with asyncio.timeout(20):
        await prober.idle()
    await pinger.close()
    assert recorder.buffered == 3 * len(sb.HOSTILE)
    assert metrics.value("soundcheck_poller_pings_total", {"status": "system_error"}) \
        == 3 * len(sb.HOSTILE)
    assert all(s.in_flight == 0 for s in states)


async def test_connection_refused_is_system_error() -> None:
    pinger = LatencyApiPinger(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    await pinger.start()
    try:
        result = await ping(pinger, "127.0.0.1")
    finally:
        await pinger.close()
    assert result.status is E
    assert "unreachable" in result.detail


async def test_invalid_target_never_reaches_a_url(standin: LatencyStandIn) -> None:
    pinger = LatencyApiPinger(standin.url)
    await pinger.start()
    try:
        for bad in ("../../etc/passwd", "host.example", "", "1.2.3.4 5"):
            assert (await ping(pinger, bad)).status is E
    finally:
        await pinger.close()
    assert sum(standin.requests.values()) == 0


async def test_group_and_address_are_encoded_in_the_path(standin: LatencyStandIn) -> None:
    pinger = LatencyApiPinger(standin.url, group="Sound Check")
    await pinger.start()
    try:
        assert (await ping(pinger, "::1")).status is S
    finally:
        await pinger.close()
    assert standin.requests["::1"] == 1


async def test_requests_go_under_the_base_urls_path() -> None:
    # An API behind a path prefix (a gateway route): every request keeps the prefix, the
    # group and an IPv6 address arrive percent-encoded, IPv4 as it is.
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"elapsed": 1.5, "error": None, "success": True,
                                  "rtt_ms": 1.5})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for route in get_args(LatencyRoute):
            pinger = LatencyApiPinger(f"http://127.0.0.1:{port}/gw/v%201/",
                                      route=route, group="Sound Check")
            await pinger.start()
            try:
                for ip in ("127.0.0.1", "::1"):
                    assert (await ping(pinger, ip)).status is S
            finally:
                await pinger.close()
    finally:
        await runner.cleanup()
    assert seen == ["/gw/v%201/latency/Sound%20Check/127.0.0.1/",
                    "/gw/v%201/latency/Sound%20Check/%3A%3A1/", "/gw/v%201/ping", "/gw/v%201/ping"]


async def test_prober_bounds_requests_in_flight(standin: LatencyStandIn) -> None:
    standin.delay_s = 0.05
    metrics = Metrics()
    recorder = Recorder(NullStore(), metrics, batch_size=10_000, flush_interval_s=60,
                        max_buffered=10_000, max_backoff_s=1)
    pinger = LatencyApiPinger(standin.url, concurrency=4)
    await pinger.start()
    prober = Prober(pinger, recorder, metrics, concurrency=4, timeout_s=5)
    job = Job(uuid4(), "127.0.0.5", 1, 60, datetime.now(UTC))
    state = JobState(job, "127.0.0.5", None, 0)
    for k in range(40):
        prober.on_slot(state, k, time.time())
    async with asyncio.timeout(10):
        await prober.idle()
    await pinger.close()
    assert standin.requests["127.0.0.5"] == 40
    assert standin.max_active == 4
    assert recorder.buffered == 40
    assert state.in_flight == 0
