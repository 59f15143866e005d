"""End to end: real poller processes, a real Postgres, the scripted latency API on loopback.

Each test checks the database afterwards: every slot that fell due in the observed window
has exactly one sample, no ping was made twice, nothing buffered was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest

from poller.localpg import LocalPostgres
from tests.conftest import JWT_SECRET, SERVICE_ROLE_KEY, DbEnv
from tests.support.checks import assert_every_slot_once, load
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.postgrest_standin import PostgrestStandIn
from tests.support.processes import PollerProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

FAST = {"POLL_INTERVAL_MS": "500", "BATCH_FLUSH_INTERVAL_MS": "200",
        "RETRY_MAX_BACKOFF_MS": "400", "DB_TIMEOUT_MS": "2000", "LOG_LEVEL": "INFO"}


def targets(n: int, net: int = 1) -> list[str]:
    return [f"127.0.{net}.{i + 1}" for i in range(n)]


async def stop_all(procs: list[PollerProcess]) -> list[int]:
    for p in procs:
        p.terminate()
    return list(await asyncio.gather(*(p.wait() for p in procs)))


async def _every_job_written(dsn: str, ids: list[UUID]) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval(
            "select count(distinct job_id) from samples where job_id = any($1)",
            ids) == len(ids))
    finally:
        await conn.close()


async def _backlog_written(poller: PollerProcess) -> bool:
    """Less than a second's samples (20 jobs at 1 s) left in the buffer: what piled up
    while the database was down (about 60) has been written."""
    return bool((await poller.get("/health"))[1]["buffered_samples"] < 20)


async def test_three_replicas_share_the_jobs_every_slot_once(
        dsn: str, db_env: DbEnv, standin: LatencyStandIn) -> None:
    conn = await asyncpg.connect(dsn)
    ips = targets(50)
    ids = await add_jobs(conn, ips, cadence_seconds=[1 + i % 2 for i in range(50)])
    await add_jobs(conn, targets(5, net=2), mode="simulated")  # never pinged by us
    env = {**FAST, **await db_env(dsn), "LATENCY_API_URL": standin.url, "REPLICA_COUNT": "3"}
    procs = [PollerProcess({**env, "HOSTNAME": f"soundcheck-poller-{i}"}) for i in range(3)]
    try:
        for p in procs:
            await p.start()
        await asyncio.gather(*(p.synced() for p in procs))
        ready_at = time.time()
        owned = [(await p.get("/health"))[1]["owned_jobs"] for p in procs]
        assert sum(owned) == 50 and all(owned), owned  # a partition, all replicas busy
        await asyncio.sleep(6)  # the observed window
        stop_at = time.time()
        assert await stop_all(procs) == [0, 0, 0]
    finally:
        for p in procs:
            await p.kill()
    checked = assert_every_slot_once(await load(conn, ids), standin.requests,
                                     must_start=ready_at, must_end=stop_at - 0.2,
                                     may_end=stop_at + 0.5)
    assert checked >= 50 * 6 * 0.75 - 10
    assert not any(standin.requests[ip] for ip in targets(5, net=2))
    await conn.close()


async def test_database_outage_loses_no_sample(own_pg: LocalPostgres, db_env: DbEnv,
                                               standin: LatencyStandIn) -> None:
    conn = await asyncpg.connect(own_pg.dsn)
    ids = await add_jobs(conn, targets(20), cadence_seconds=1)
    await conn.close()
    poller = PollerProcess({**FAST, **await db_env(own_pg.dsn), "LATENCY_API_URL": standin.url})
    try:
        await poller.start()
        await poller.synced()
        ready_at = time.time()
        await eventually(lambda: _every_job_written(own_pg.dsn, ids), timeout=10,
                         what="a sample of every job before the outage")
        await asyncio.to_thread(own_pg.stop, "immediate")
        await poller.until_ready_is(503)
        _, health = await poller.get("/health")
        assert health["status"] == "ok" and health["owned_jobs"] == 20  # alive, still pinging
        await asyncio.sleep(3)  # the outage: three cadences of every job
        await asyncio.to_thread(own_pg.start)
        await poller.until_ready_is(200)
        await eventually(lambda: _backlog_written(poller), timeout=10,
                         what="what was buffered in the outage written")
        stop_at = time.time()
        poller.terminate()
        assert await poller.wait() == 0
    finally:
        await poller.kill()
    conn = await asyncpg.connect(own_pg.dsn)
    assert_every_slot_once(await load(conn, ids), standin.requests, must_start=ready_at,
                           must_end=stop_at - 0.2, may_end=stop_at + 0.5)
    await conn.close()
    assert "sync failed, keeping the 20 jobs known" in poller.log


async def test_sigterm_writes_every_buffered_sample(own_pg: LocalPostgres, db_env: DbEnv,
                                                    standin: LatencyStandIn) -> None:
    conn = await asyncpg.connect(own_pg.dsn)
    ids = await add_jobs(conn, targets(50), cadence_seconds=1)
    await conn.close()
    standin.delay_s = 0.3  # pings are in flight when SIGTERM arrives
    poller = PollerProcess({**FAST, **await db_env(own_pg.dsn), "LATENCY_API_URL": standin.url,
                            "BATCH_SIZE": "20", "SHUTDOWN_GRACE_MS": "20000"})
    try:
        await poller.start()
        await poller.synced()
        await eventually(lambda: _every_job_written(own_pg.dsn, ids), timeout=10,
                         what="a sample of every job")
        # Writes fail from here: the samples of the next seconds pile up in the buffer.
        await asyncio.to_thread(own_pg.stop, "immediate")

        async def several_batches_buffered() -> bool:
            return bool((await poller.get("/health"))[1]["buffered_samples"] >= 5 * 20)
        await eventually(several_batches_buffered, timeout=10, what="100 samples buffered")
        poller.terminate()
        await poller.until_ready_is(503, timeout=5)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_pg.start)
        assert await poller.wait() == 0
    finally:
        await poller.kill()
    assert "all samples written" in poller.log
    conn = await asyncpg.connect(own_pg.dsn)
    jobs = await load(conn, ids)
    await conn.close()
    assert sum(standin.requests.values()) == sum(len(j.seqs) for j in jobs)
    for job in jobs:
        assert standin.requests[job.target_ip] == len(job.seqs) == len(set(job.seqs))


async def test_rejected_supabase_key_is_not_ready_and_said_once(
        dsn: str, standin: LatencyStandIn) -> None:
    rest = PostgrestStandIn(dsn, JWT_SECRET)
    await rest.start()
    wrong = "wrong-key-" + "z" * 30
    poller = PollerProcess({**FAST, "SUPABASE_URL": rest.url, "SUPABASE_SERVICE_ROLE_KEY": wrong,
                            "LATENCY_API_URL": standin.url})
    try:
        await poller.start()
        await poller.logged("Supabase refused the service-role key")
        async with asyncio.timeout(30):  # several more refused syncs, no crash loop
            await rest.progress.wait_for(lambda: len(rest.calls) >= 4)
        status, body = await poller.get("/ready")
        assert status == 503 and "SUPABASE_SERVICE_ROLE_KEY" in str(body)
        assert (await poller.get("/health"))[0] == 200
        assert poller.proc is not None and poller.proc.returncode is None
        poller.terminate()
        assert await poller.wait() == 0
    finally:
        await poller.kill()
        await rest.stop()
    said = [line for line in poller.lines if "refused the service-role key" in line]
    assert len(said) == 1  # at most once a minute
    assert wrong not in poller.log and wrong not in str(body)


async def test_missing_sql_api_through_supabase_says_to_migrate(
        fresh_db: str, standin: LatencyStandIn) -> None:
    rest = PostgrestStandIn(fresh_db, JWT_SECRET)
    await rest.start()
    poller = PollerProcess({**FAST, "SUPABASE_URL": rest.url,
                            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
                            "LATENCY_API_URL": standin.url})
    try:
        await poller.start()
        await poller.logged("python -m poller migrate")
        status, body = await poller.get("/ready")
        assert status == 503 and "PGRST202" in str(body)
        poller.terminate()
        assert await poller.wait() == 0
    finally:
        await poller.kill()
        await rest.stop()
    assert SERVICE_ROLE_KEY not in poller.log


def _server_pids(pg: LocalPostgres) -> list[int]:
    """The postmaster and every process it started (all of the server)."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def test_stop_ends_within_the_grace_with_the_database_frozen(
        own_pg: LocalPostgres, standin: LatencyStandIn) -> None:
    # A partition, not a refused connection: the server is stopped (SIGSTOP), so calls
    # neither fail nor answer. The client timeouts (10 s) are longer than the grace (3 s).
    conn = await asyncpg.connect(own_pg.dsn)
    await add_jobs(conn, targets(50), cadence_seconds=1)
    await conn.close()
    poller = PollerProcess({**FAST, "DATABASE_URL": own_pg.dsn, "LATENCY_API_URL": standin.url,
                            "BATCH_SIZE": "20", "DB_TIMEOUT_MS": "10000",
                            "SHUTDOWN_GRACE_MS": "3000"})
    pids: list[int] = []
    try:
        await poller.start()
        await poller.synced()
        pids = _server_pids(own_pg)  # the postmaster and every backend, the poller's too
        _signal_all(pids, signal.SIGSTOP)
        async with asyncio.timeout(10):  # samples pile up behind a write that hangs
            await standin.progress.wait_for(lambda: sum(standin.requests.values()) >= 150)
        started = time.monotonic()
        poller.terminate()
        rc = await poller.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        _signal_all(pids, signal.SIGCONT)
        await poller.kill()
    print(f"\nstop with the database frozen: {took:.1f}s (grace 3s), exit code {rc}")
    assert rc == 1  # samples were given up, and the exit code says so
    assert took < 3 + 1.5, f"stop took {took:.1f}s with a 3s grace"
    assert "gave up on" in poller.log
