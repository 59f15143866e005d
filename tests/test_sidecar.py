"""The latency sidecar and the poller's Latency API client, tested against each other with
real ICMP on loopback (and an absent host in a test namespace when root)."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import get_args

import aiohttp
import asyncpg
import pytest

from poller.localpg import free_port
from poller.models import LatencyRoute, SampleStatus
from poller.pingers import ping
from poller.pingers.latency_api import LatencyApiPinger
from poller.service import Service
from poller.settings import Settings
from tests.support.db import add_jobs
from tests.support.netns import NetnsHost, unavailable_reason


@pytest.mark.parametrize("route", get_args(LatencyRoute))
async def test_client_and_sidecar_agree(sidecar: str, route: LatencyRoute) -> None:
    client = LatencyApiPinger(sidecar, route=route, timeout_s=5)
    await client.start()
    try:
        results = await asyncio.gather(*(ping(client, ip) for ip in
                                         ["127.0.0.1", "127.0.0.9", "::1"] * 20))
    finally:
        await client.close()
    assert all(r.status is SampleStatus.SUCCESS and r.rtt_ms and r.rtt_ms > 0 for r in results)


async def test_bad_ip_gets_400(sidecar: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sidecar}/latency/Sound%20Check/not-an-ip/") as resp:
            assert resp.status == 400 and "invalid IP" in (await resp.json())["error"]
        async with session.post(f"{sidecar}/ping", json={"ip": "1.2.3"}) as resp:
            assert resp.status == 400
        async with session.post(f"{sidecar}/ping", data=b"{") as resp:
            assert resp.status == 400
        async with session.get(f"{sidecar}/latency/g/127.0.0.1/") as resp:
            body = await resp.json()
            assert set(body) == {"elapsed", "error", "expected", "ip", "poller"}
            assert body["elapsed"] > 0 and body["error"] is None


@pytest.mark.slow  # seconds: out of the fast lane
async def test_absent_host_is_classified_missed(sidecar: str) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    host = NetnsHost(f"sc-side-{os.getpid() % 10000}", 4)
    host.create()
    try:
        for route in get_args(LatencyRoute):
            client = LatencyApiPinger(sidecar, route=route, timeout_s=5)
            await client.start()
            try:
                result = await ping(client, host.absent_ip)
            finally:
                await client.close()
            assert result.status is SampleStatus.MISSED, (route, result)
    finally:
        host.destroy()


async def test_poller_with_in_process_icmp(conn: asyncpg.Connection, dsn: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("raw ICMP sockets need root here")
    job_ids = await add_jobs(conn, ["127.0.0.1", "::1", "127.0.0.77"], cadence_seconds=1)
    svc = Service(Settings.from_env({
        "DATABASE_URL": dsn, "PING_BACKEND": "icmp", "ICMP_SOCKET": "raw",
        "PORT": str(free_port()), "POLL_INTERVAL_MS": "200", "BATCH_FLUSH_INTERVAL_MS": "100",
        "PING_TIMEOUT_MS": "1000"}))
    await svc.start()
    try:
        async with asyncio.timeout(10):
            await svc.progress.wait_for(
                lambda: svc.metrics.value("soundcheck_poller_samples_written_total") >= 6)
    finally:
        assert await svc.stop()
    rows = await conn.fetch("select job_id, status, rtt_ms from samples")
    assert {r["job_id"] for r in rows} == set(job_ids)
    assert all(r["status"] == "success" and r["rtt_ms"] is not None for r in rows)


async def test_sidecar_serves_pings_on_loopback_only_and_health_everywhere() -> None:
    # Anyone who reaches the ping API can make it ping anything: by default it listens on
    # 127.0.0.1 alone. The kubelet probes the pod IP, so /health (only) has its own port.
    if os.geteuid() != 0:
        pytest.skip("the sidecar's raw ICMP socket needs root here")
    port, health = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poller.sidecar", "--port", str(port), "--health-port",
        str(health), "--socket", "raw", stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            while b"latency sidecar on" not in await proc.stderr.readline():
                pass
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"http://127.0.0.1:{port}/latency/g/127.0.0.1/") as resp:
                assert resp.status == 200 and (await resp.json())["elapsed"] > 0
            with pytest.raises(aiohttp.ClientConnectionError):  # another address: refused
                await session.get(f"http://127.0.0.2:{port}/health")
            async with session.get(f"http://127.0.0.2:{health}/health") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.2:{health}/latency/g/127.0.0.1/") as resp:
                assert resp.status == 404  # the health port serves nothing else
            for denied in ("224.0.0.1", "255.255.255.255", "0.0.0.0", "fe80::1%25lo"):
                async with session.get(f"http://127.0.0.1:{port}/latency/g/{denied}/") as resp:
                    assert resp.status == 400, denied
    finally:
        proc.terminate()
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
