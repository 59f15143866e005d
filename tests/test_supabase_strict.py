"""The SQL API as Supabase really serves it: roles from the key, db-max-rows, default
privileges; and migrations that are safe on the app's live database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from poller.localpg import free_port
from poller.migrate import migrate, migrations, repeatables
from poller.models import Sample, SampleStatus
from poller.service import Service
from poller.settings import Settings
from poller.store import API_VERSION, StoreMisconfigured
from poller.store.postgres import PostgresStore
from poller.store.supabase import SupabaseStore
from tests.conftest import JWT_SECRET, SERVICE_ROLE_KEY
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.postgrest_standin import PostgrestStandIn
from tests.test_migrations import APP_SCHEMA

OURS = """
select p.oid::regprocedure::text as fn, p.proconfig
from pg_proc p
where p.pronamespace = 'public'::regnamespace
  and (p.proname ~ '^(poller|soundcheck)_'
       or obj_description(p.oid, 'pg_proc') = 'soundcheck-poller')
"""


@pytest.fixture
async def rest(dsn: str) -> AsyncIterator[PostgrestStandIn]:
    r = PostgrestStandIn(dsn, JWT_SECRET, max_rows=1000)
    await r.start()
    yield r
    await r.stop()


async def _rpc(rest: PostgrestStandIn, role: str, fn: str, args: dict[str, object]
               ) -> tuple[int, Any]:  # Any: the JSON answer
    key = rest.key(role)
    async with aiohttp.ClientSession() as s, s.post(
            f"{rest.url}/rest/v1/rpc/{fn}", json=args,
            headers={"apikey": key, "Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def test_browser_roles_can_call_and_write_nothing_of_ours(
        conn: asyncpg.Connection, rest: PostgrestStandIn) -> None:
    fns = await conn.fetch(OURS)
    assert len(fns) >= 12
    for row in fns:
        assert any(c.startswith("search_path=") for c in row["proconfig"] or ()), row["fn"]
        for role in ("anon", "authenticated"):
            assert not await conn.fetchval(
                "select has_function_privilege($1, $2, 'execute')", role, row["fn"]), \
                (role, row["fn"])
    tables = {r["relname"] for r in await conn.fetch(
        "select relname from pg_class where relnamespace = 'public'::regnamespace "
        "and relkind = 'r' and (relname like 'poller\\_%' or relname like 'soundcheck\\_%')")}
    assert {"soundcheck_migrations", "soundcheck_repeatables", "poller_topology",
            "poller_heartbeats", "poller_outbox", "poller_job_changes",
            "poller_owned_buckets"} <= tables
    for table in sorted(tables):
        assert await conn.fetchval(
            "select relrowsecurity from pg_class where oid = $1::regclass", table)
        for role in ("anon", "authenticated"):
            for priv in ("select", "insert", "update", "delete"):
                assert not await conn.fetchval(
                    "select has_table_privilege($1, $2, $3)", role, table, priv), \
                    (role, table, priv)
    assert await conn.fetchval(
        "select to_regprocedure('soundcheck_restrict_to_service_role(text[])')") is None
    # Through the gateway, with the key every browser holds: refused, whatever is asked.
    calls: tuple[tuple[str, dict[str, object]], ...] = (
        ("soundcheck_owned_buckets", {"p_replica_id": 0, "p_replica_counts": [1] * 100}),
        ("soundcheck_bucket", {"p_job_id": "11111111-1111-1111-1111-111111111111"}),
        ("soundcheck_lock_down", {}),
        ("poller_fleet_state", {"p_fleet": "x"}),
        ("poller_jobs_page", {"p_replica_id": 0, "p_replica_counts": [1], "p_after": None,
                              "p_limit": 10}),
        # the outbox holds every requester's address: not for a browser
        ("poller_claim_notices", {"p_claimer": "x", "p_limit": 10, "p_lease_s": 60}),
        ("soundcheck_job_summary", {"p_job_id": "11111111-1111-1111-1111-111111111111"}))
    for fn, args in calls:
        status, body = await _rpc(rest, "anon", fn, args)
        assert status == 401 and body["code"] == "42501", (fn, status, body)
    assert await _rpc(rest, "service_role", "poller_api_version", {}) == (200, API_VERSION)


async def test_every_owned_job_is_pinged_past_db_max_rows(
        conn: asyncpg.Connection, dsn: str, rest: PostgrestStandIn,
        standin: LatencyStandIn) -> None:
    ids = await add_jobs(conn, [f"127.0.{i // 250 + 10}.{i % 250 + 1}" for i in range(1500)],
                         cadence_seconds=60)
    # The stand-in cuts a set-returning RPC as PostgREST does: the old sync lost a third.
    status, rows = await _rpc(rest, "service_role", "poller_sync_jobs",
                              {"p_replica_id": 0, "p_replica_counts": [1]})
    assert status == 200 and isinstance(rows, list) and len(rows) == 1000
    svc = Service(Settings.from_env({
        "SUPABASE_URL": rest.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
        "LATENCY_API_URL": standin.url, "PORT": str(free_port()), "SYNC_PAGE_SIZE": "600",
        "POLL_INTERVAL_MS": "200"}))
    await svc.start()
    try:
        async with asyncio.timeout(20):
            await svc.progress.wait_for(lambda: svc.first_sync_done)
        assert set(svc.scheduler.jobs) == set(ids)
    finally:
        await svc.stop()
    assert set(rest.roles) == {"service_role"}


async def test_pasting_every_file_again_changes_nothing(conn: asyncpg.Connection) -> None:
    """As in the Supabase SQL editor: each file in one transaction, in order."""
    before = await conn.fetch(_FUNCTIONS)
    for text in [m.sql for m in migrations() if not m.sql.startswith("-- soundcheck-migrate: no-")
                 ] + [r.sql for r in repeatables()]:
        async with conn.transaction():
            await conn.execute(text)
    assert await conn.fetch(_FUNCTIONS) == before
    assert await conn.fetchval("select poller_api_version()") == API_VERSION


_FUNCTIONS = ("select p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.proacl::text "
              "from pg_proc p where p.pronamespace = 'public'::regnamespace order by 1")


async def test_an_invalid_unique_index_is_refused_then_rebuilt(
        conn: asyncpg.Connection, dsn: str) -> None:
    [job] = await add_jobs(conn, ["127.0.0.1"])
    # What a failed CREATE UNIQUE INDEX CONCURRENTLY leaves behind.
    await conn.execute("update pg_index set indisvalid = false "
                       "where indexrelid = 'samples_job_id_sequence_number_key'::regclass")
    store = PostgresStore(dsn, 5)
    await store.open()
    try:
        sample = Sample(job, 0, SampleStatus.MISSED, None, None, time.time())
        with pytest.raises(StoreMisconfigured, match="python -m poller migrate"):
            await store.record_batch([sample], [])
        await conn.execute("delete from soundcheck_migrations where version = 5")
        await migrate(dsn)
        assert await conn.fetchval("select indisvalid from pg_index where indexrelid = "
                                   "'samples_job_id_sequence_number_key'::regclass")
        assert (await store.record_batch([sample], [])).inserted == 1
    finally:
        await store.close()


async def test_migrating_the_live_app_database_never_blocks_it(fresh_db: str) -> None:
    app = await asyncpg.connect(fresh_db)
    reader = await asyncpg.connect(fresh_db)
    try:
        await app.execute(APP_SCHEMA)
        # A long transaction of the app that has read jobs and samples.
        tx = reader.transaction()
        await tx.start()
        await reader.fetch("select * from jobs, samples")
        running = asyncio.create_task(migrate(fresh_db))
        # Meanwhile the app goes on reading and writing both tables (each within 2 s).
        for _ in range(3):
            async with asyncio.timeout(2):
                await app.execute(
                    "insert into samples (job_id, sequence_number, status) values "
                    "('11111111-1111-1111-1111-111111111111', 100 + "
                    "(select count(*) from samples), 'missed')")
                await app.execute("update jobs set last_ping_at = now()")
        assert not running.done()  # the concurrent builds wait for that transaction …
        await tx.rollback()
        async with asyncio.timeout(30):
            report = await running  # … and finish once it ends
        assert all(applied for _, applied in report)
        assert await app.fetchval("select indisvalid from pg_index where indexrelid = "
                                  "'samples_job_id_sequence_number_key'::regclass")
    finally:
        await reader.close()
        await app.close()


@pytest.mark.slow  # seconds: out of the fast lane
async def test_migration_stops_with_a_hint_rather_than_queue_behind_a_lock(
        fresh_db: str) -> None:
    app = await asyncpg.connect(fresh_db)
    holder = await asyncpg.connect(fresh_db)
    try:
        await app.execute(APP_SCHEMA)  # alerts has row level security off there
        tx = holder.transaction()
        await tx.start()
        await holder.execute("lock table alerts in access share mode")
        async with asyncio.timeout(20):
            with pytest.raises(Exception) as err:
                await migrate(fresh_db)
        assert "run the migration again" in str(err.value)
        await tx.rollback()
        await migrate(fresh_db)
        assert json.loads(json.dumps(await app.fetchval("select poller_api_version()"))) \
            == API_VERSION
    finally:
        await holder.close()
        await app.close()


@pytest.mark.parametrize("transport", ["postgres", "supabase"])
async def test_each_store_writes_the_ping_times_it_was_given(
        conn: asyncpg.Connection, dsn: str, rest: PostgrestStandIn, transport: str) -> None:
    # Unix seconds in (the pipeline's float), timestamptz out, to the microsecond, each on
    # its own sample whatever the order of the batch.
    [job] = await add_jobs(conn, ["127.0.0.1"])
    times = {0: 1_764_700_000.123456, 1: 1_764_700_001.000001, 2: 1_764_699_999.5,
             3: 1_764_700_000.999999}
    samples = [Sample(job, k, SampleStatus.SUCCESS, 1.25, None, times[k]) for k in (2, 0, 3, 1)]
    store: PostgresStore | SupabaseStore = (
        PostgresStore(dsn, 5) if transport == "postgres"
        else SupabaseStore(rest.url, SERVICE_ROLE_KEY, 5))
    await store.open()
    try:
        assert (await store.record_batch(samples, [])).inserted == 4
    finally:
        await store.close()
    rows = await conn.fetch("select sequence_number, recorded_at from samples "
                            "where job_id = $1", job)
    assert len(rows) == 4
    for r in rows:
        assert abs(r["recorded_at"].timestamp() - times[r["sequence_number"]]) <= 1e-6, r
