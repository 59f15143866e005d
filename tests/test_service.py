"""The service in-process against the real Postgres: sync semantics, completion, probes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from poller.localpg import free_port
from poller.progress import Progress
from poller.service import Service
from poller.settings import Settings
from tests.conftest import JWT_SECRET, SERVICE_ROLE_KEY
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.postgrest_standin import PostgrestStandIn

FAST = {"POLL_INTERVAL_MS": "200", "BATCH_FLUSH_INTERVAL_MS": "100",
        "RETRY_MAX_BACKOFF_MS": "300", "DB_TIMEOUT_MS": "1000", "SHUTDOWN_GRACE_MS": "5000"}


def settings(dsn: str, standin: LatencyStandIn, **extra: str) -> Settings:
    return Settings.from_env({**FAST, "DATABASE_URL": dsn, "LATENCY_API_URL": standin.url,
                              "PORT": str(free_port()), **extra})


async def until(progress: Progress, cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        await progress.wait_for(cond)


def count(svc: Service, name: str) -> float:
    return svc.metrics.value(f"soundcheck_poller_{name}_total")


async def get(svc: Service, path: str) -> tuple[int, Any]:  # Any: JSON, or /metrics' text
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        url = f"http://127.0.0.1:{svc.settings.port}{path}"
        async with session.get(url) as resp:
            return resp.status, await (resp.text() if path == "/metrics" else resp.json())


@pytest.mark.slow  # seconds: out of the fast lane
async def test_a_cancelled_job_gets_no_ping_after_the_sync_that_saw_it(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    keep, cancel = await add_jobs(conn, ["127.0.0.1", "127.0.0.2"], cadence_seconds=1)
    svc = Service(settings(dsn, standin))
    await svc.start()
    try:
        await until(standin.progress, lambda: standin.requests["127.0.0.2"] >= 2)
        await conn.execute("update jobs set status = 'cancelled' where id = $1", cancel)
        syncs = count(svc, "syncs")
        await until(svc.progress, lambda: count(svc, "syncs") >= syncs + 2)  # one started after
        seen_at = time.time()
        pings_then = standin.requests["127.0.0.2"]
        keep_then = standin.requests["127.0.0.1"]
        await until(standin.progress, lambda: standin.requests["127.0.0.1"] >= keep_then + 2)
        assert standin.requests["127.0.0.2"] == pings_then
        assert cancel not in svc.scheduler.jobs and keep in svc.scheduler.jobs
    finally:
        assert await svc.stop()
    late = await conn.fetchval(
        "select count(*) from samples where job_id = $1 and recorded_at > to_timestamp($2)",
        cancel, seen_at)
    assert late == 0


@pytest.mark.slow  # seconds: out of the fast lane
async def test_two_replicas_racing_complete_a_job_once_with_rollups(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    started = datetime.now(UTC) - timedelta(seconds=57.5)  # a 1-minute job, 2.5 s left
    (job,) = await add_jobs(conn, ["127.0.0.3"], cadence_seconds=1, duration_minutes=1,
                            started_at=started)
    # Both own every job (each thinks it is the only replica): the worst race there is.
    a, b = Service(settings(dsn, standin)), Service(settings(dsn, standin))
    await a.start()
    await b.start()
    try:
        await until(a.progress, lambda: a.first_sync_done and not a.scheduler.jobs)
        await until(b.progress, lambda: b.first_sync_done and not b.scheduler.jobs)
    finally:
        assert await a.stop() and await b.stop()
    row = await conn.fetchrow("select status, completed_at from jobs where id = $1", job)
    assert row["status"] == "completed" and row["completed_at"] >= started + timedelta(minutes=1)
    assert count(a, "jobs_completed") + count(b, "jobs_completed") == 1
    seqs = [r[0] for r in await conn.fetch(
        "select sequence_number from samples where job_id = $1 order by 1", job)]
    assert seqs == [58, 59]  # both replicas pinged them; one row each
    rollup = await conn.fetchrow(
        "select sum(sample_count) n, sum(success_count) ok from sample_rollups "
        "where job_id = $1", job)
    assert (rollup["n"], rollup["ok"]) == (2, 2)  # built after the last sample was in


async def test_an_expired_job_found_at_start_is_completed(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    started = datetime.now(UTC) - timedelta(minutes=5)
    (job,) = await add_jobs(conn, ["127.0.0.4"], duration_minutes=2, started_at=started)
    svc = Service(settings(dsn, standin))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "jobs_completed") == 1)
    finally:
        await svc.stop()
    assert await conn.fetchval("select status from jobs where id = $1", job) == "completed"
    assert standin.requests["127.0.0.4"] == 0  # its slots are past: none invented


async def test_invalid_and_missing_targets_are_recorded_as_system_error(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    bad, missing = await add_jobs(conn, ["999.1.1.1", None], cadence_seconds=1)
    svc = Service(settings(dsn, standin))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "samples_written") >= 4)
    finally:
        await svc.stop()
    rows = await conn.fetch("select distinct job_id, status from samples")
    assert {(r["job_id"], r["status"]) for r in rows} == {
        (bad, "system_error"), (missing, "system_error")}
    assert sum(standin.requests.values()) == 0


async def test_probes_and_metrics(conn: asyncpg.Connection, dsn: str,
                                  standin: LatencyStandIn) -> None:
    await add_jobs(conn, ["127.0.0.5", "127.0.0.6"], cadence_seconds=1)
    svc = Service(settings(dsn, standin, REPLICA_COUNT="1"))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "samples_written") >= 2)
        status, health = await get(svc, "/health")
        assert status == 200
        assert health["status"] == "ok" and health["replica"] == "0/1"
        assert health["owned_jobs"] == 2
        assert {"pings_in_flight", "buffered_samples", "last_good_sync_age_s"} <= set(health)
        assert (await get(svc, "/ready"))[0] == 200
        status, text = await get(svc, "/metrics")
        for name in ("soundcheck_poller_pings_total{status=\"success\"}",
                     "soundcheck_poller_rtt_seconds_bucket", "soundcheck_poller_lateness_seconds",
                     "soundcheck_poller_buffered_samples", "soundcheck_poller_flush_errors_total",
                     "soundcheck_poller_owned_jobs 2.0"):
            assert name in text, name
    finally:
        await svc.stop()


async def test_not_ready_while_the_database_is_unreachable(standin: LatencyStandIn) -> None:
    dsn = f"postgresql://poller:hunter2@127.0.0.1:{free_port()}/soundcheck"
    svc = Service(settings(dsn, standin))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "sync_errors") >= 1)
        status, body = await get(svc, "/ready")
        assert status == 503 and "no successful job sync yet" in body["reasons"]
        assert "hunter2" not in str(body)
        status, health = await get(svc, "/health")
        assert status == 200 and "hunter2" not in str(health)
    finally:
        await svc.stop()


async def test_missing_sql_api_says_how_to_fix(fresh_db: str, standin: LatencyStandIn,
                                               caplog: pytest.LogCaptureFixture) -> None:
    svc = Service(settings(fresh_db, standin))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "sync_errors") >= 3)
        status, body = await get(svc, "/ready")
        assert status == 503
        assert "python -m poller migrate" in str(body)
    finally:
        await svc.stop()
    said = [r for r in caplog.records if "python -m poller migrate" in r.getMessage()]
    assert len(said) == 1  # once a minute, not once per sync


@pytest.mark.slow  # seconds: out of the fast lane
async def test_supabase_transport_makes_one_rpc_per_sync_and_per_batch(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    await add_jobs(conn, [f"127.0.3.{i}" for i in range(1, 21)], cadence_seconds=1)
    rest = PostgrestStandIn(dsn, JWT_SECRET)
    await rest.start()
    svc = Service(Settings.from_env({
        **FAST, "SUPABASE_URL": rest.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
        "LATENCY_API_URL": standin.url, "PORT": str(free_port()), "BATCH_SIZE": "1000"}))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "samples_written") >= 60)
    finally:
        assert await svc.stop()
        await rest.stop()
    calls = Counter(rest.calls)
    assert set(calls) == {"poller_api_version", "poller_job_changes", "poller_record_samples"}
    assert calls["poller_api_version"] == 1
    # One call per sync: the first a full read (20 jobs, one page), the others the changes.
    assert calls["poller_job_changes"] == count(svc, "syncs")
    assert count(svc, "full_syncs") == 1
    assert calls["poller_record_samples"] == count(svc, "flushes")
    written = await conn.fetchval("select count(*) from samples")
    assert written == count(svc, "samples_written") and written >= 60
    assert calls["poller_record_samples"] * 5 <= written  # batches, not one request per ping


async def test_a_loop_that_crashes_makes_the_exit_code_non_zero(
        dsn: str, standin: LatencyStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = Service(settings(dsn, standin))

    async def broken() -> None:
        raise RuntimeError("a bug in a loop")

    monkeypatch.setattr(svc.recorder, "run", broken)
    async with asyncio.timeout(30):
        assert await svc.run() == 1  # before: 0, as if all was well


async def test_an_asyncpg_state_error_is_an_outage_not_a_crash(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg raised InternalClientError ("cannot switch to state …") out of the store on a
    # database restart, and the recorder loop died with the samples it held.
    import asyncpg.exceptions

    from poller.store import StoreUnavailable
    from poller.store.postgres import PostgresStore

    store = PostgresStore(dsn, 5)
    await store.open()
    try:
        assert store._pool is not None
        async with store._pool.acquire() as conn:
            connection_class = type(conn)

        async def state_error(self: object, *a: object, **k: object) -> object:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress")

        with monkeypatch.context() as patched:
            patched.setattr(connection_class, "fetchval", state_error)
            with pytest.raises(StoreUnavailable, match="InternalClientError"):
                await store.api_version()
        assert await store.api_version() >= 4  # a fresh connection works
    finally:
        await store.close()


async def test_a_job_with_no_cadence_gets_a_system_error_and_is_completed(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    # Before: ignored, and `running` for ever. Now: one system_error sample saying why, and
    # completed at its end (duration 0: at once).
    started = datetime.now(UTC) - timedelta(minutes=2)
    [no_cadence] = await add_jobs(conn, ["127.0.0.1"], cadence_seconds=0,
                                  duration_minutes=1, started_at=started)
    [no_duration] = await add_jobs(conn, ["127.0.0.1"], cadence_seconds=5,
                                   duration_minutes=0, started_at=started)
    svc = Service(settings(dsn, standin))
    await svc.start()
    try:
        await until(svc.progress, lambda: count(svc, "jobs_completed") >= 2)
    finally:
        assert await svc.stop()
    rows = await conn.fetch("select job_id, sequence_number, status::text from samples")
    assert sorted((r["job_id"], r["sequence_number"], r["status"]) for r in rows) == sorted(
        [(no_cadence, 0, "system_error"), (no_duration, 0, "system_error")])
    assert {r["status"] for r in await conn.fetch("select status::text from jobs")} == {
        "completed"}
    assert sum(standin.requests.values()) == 0  # never sent to the pinger


async def test_a_value_the_database_rejects_is_set_aside_on_both_transports(
        conn: asyncpg.Connection, dsn: str, db_env: Any) -> None:
    # numeric(10,2) holds no 1e9 ms: Postgres refuses the batch with SQLSTATE 22003 (through
    # PostgREST: HTTP 400 with that code). Before: an outage, retried for ever, every later
    # sample held up. Now: that sample is set aside and the rest written.
    from poller.metrics import Metrics
    from poller.models import Sample, SampleStatus
    from poller.recorder import Recorder
    from poller.store import make_store

    [job] = await add_jobs(conn, ["127.0.0.1"])
    store = make_store(Settings.from_env(await db_env(dsn)))
    await store.open()
    metrics = Metrics()
    rec = Recorder(store, metrics, batch_size=50, flush_interval_s=0.05, max_buffered=1000,
                   max_backoff_s=0.1)
    task = asyncio.create_task(rec.run())
    now = time.time()
    try:
        for k in range(50):
            rec.add(Sample(job, k, SampleStatus.SUCCESS, 1e9 if k == 17 else 1.5, None, now))
        async with asyncio.timeout(20):
            await rec.progress.wait_for(lambda: rec.buffered == 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    seqs = {r["sequence_number"] for r in await conn.fetch(
        "select sequence_number from samples where job_id = $1", job)}
    assert seqs == set(range(50)) - {17}
    assert metrics.value("soundcheck_poller_samples_rejected_total") == 1
    assert metrics.value("soundcheck_poller_flush_errors_total") == 0
