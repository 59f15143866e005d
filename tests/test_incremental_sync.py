"""Syncs that read only what changed (poller/sql/repeatable/20_sync.sql): every change
that matters reaches the pollers (insert, cancel, complete, edit of cadence or target,
delete, mode switch, a change committed late), nothing else does, and a full read happens
only when it must (start, topology or live-set change, a cursor it cannot honour)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from poller.localpg import LocalPostgres, free_port
from poller.partition import BUCKETS, bucket, owns
from poller.service import Service
from poller.settings import Settings
from poller.store import JobsPage
from poller.store.postgres import PostgresStore
from tests.conftest import DbEnv
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.test_service import FAST, count

ALL = list(range(BUCKETS))


async def changes(conn: asyncpg.Connection, cursor: int | None, buckets: list[int] = ALL,
                  limit: int = 1000) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(await conn.fetchval(
        "select poller_job_changes($1, $2::xid8, $3)", buckets, cursor, limit))
    out["cursor"] = int(out["cursor"])
    return out


def ids(out: dict[str, Any]) -> set[UUID]:
    return {UUID(j["id"]) for j in out["jobs"]}


async def test_each_change_that_matters_and_nothing_else(conn: asyncpg.Connection) -> None:
    kept, cancelled, completed, edited, moved, deleted, simulated = await add_jobs(
        conn, [f"127.0.0.{i}" for i in range(1, 8)])
    first = await changes(conn, None)
    assert first["full"] and ids(first) == {kept, cancelled, completed, edited, moved,
                                            deleted, simulated}
    cursor = first["cursor"]
    quiet = await changes(conn, cursor)
    assert (quiet["full"], quiet["jobs"], quiet["gone"]) == (False, [], [])

    # The poller's own writes change nothing a sync needs: no change recorded.
    await conn.execute("update jobs set last_ping_at = now(), poller_alert_seq = 3")
    await conn.fetchval("select poller_record_samples($1::uuid[], '{0}', '{success}', "
                        "'{1.0}', '{null}', array[now()], '{}', 60)", [kept])
    assert (await changes(conn, cursor))["jobs"] == []

    await conn.execute("update jobs set status = 'cancelled' where id = $1", cancelled)
    await conn.execute("update jobs set status = 'completed' where id = $1", completed)
    await conn.execute("update jobs set cadence_seconds = 7 where id = $1", edited)
    await conn.execute("update jobs set target_ip = '127.0.0.99' where id = $1", moved)
    await conn.execute("delete from jobs where id = $1", deleted)
    await conn.execute("update jobs set monitoring_mode = 'simulated' where id = $1", simulated)
    [new] = await add_jobs(conn, ["127.0.0.50"])
    await add_jobs(conn, ["127.0.0.51"], mode="simulated")  # not ours: not recorded
    out = await changes(conn, cursor)
    assert not out["full"]
    assert ids(out) == {edited, moved, new}
    rows = {UUID(j["id"]): j for j in out["jobs"]}
    assert rows[edited]["cadence_seconds"] == 7 and rows[moved]["target_ip"] == "127.0.0.99"
    assert {UUID(x) for x in out["gone"]} == {cancelled, completed, deleted, simulated}
    # Read again from the new cursor: nothing (no transaction was open meanwhile).
    assert (await changes(conn, out["cursor"]))["jobs"] == []


async def test_only_the_buckets_asked_for(conn: asyncpg.Connection) -> None:
    cursor = (await changes(conn, None))["cursor"]
    made = await add_jobs(conn, [f"127.0.1.{i}" for i in range(1, 21)])
    mine = sorted({bucket(j) for j in made[:5]})
    out = await changes(conn, cursor, mine)
    assert ids(out) == {j for j in made if bucket(j) in mine}


async def test_a_change_committed_after_younger_ones_were_read_is_not_missed(
        conn: asyncpg.Connection, dsn: str) -> None:
    cursor = (await changes(conn, None))["cursor"]
    slow = await asyncpg.connect(dsn)
    try:
        tx = slow.transaction()
        await tx.start()
        [late] = await add_jobs(slow, ["127.0.2.1"])  # its transaction stays open
        [early] = await add_jobs(conn, ["127.0.2.2"])  # committed at once
        out = await changes(conn, cursor)
        assert ids(out) == {early}  # the open transaction's job is not visible yet
        cursor = out["cursor"]
        await tx.commit()
        out = await changes(conn, cursor)
        assert late in ids(out)  # read again from the oldest open transaction on
    finally:
        await slow.close()


async def test_too_many_changes_or_a_cursor_from_the_future_mean_a_full_read(
        conn: asyncpg.Connection) -> None:
    cursor = (await changes(conn, None))["cursor"]
    await add_jobs(conn, [f"127.0.3.{i}" for i in range(1, 12)])
    assert (await changes(conn, cursor, limit=10))["full"]
    assert not (await changes(conn, cursor, limit=11))["full"]
    future = await conn.fetchval("select pg_current_xact_id()::text::bigint + 1000")
    assert (await changes(conn, future))["full"]  # a restore took the database back


async def test_the_apps_users_still_write_jobs(conn: asyncpg.Connection) -> None:
    # The trigger runs as its owner: a role with rights on jobs and none on poller tables
    # (the app's signed-in users) inserts and edits jobs as before.
    await conn.execute("create role app_writer")
    await conn.execute("grant select, insert, update, delete on jobs to app_writer")
    await conn.execute("create policy app_writer_all on jobs for all to app_writer "
                       "using (true) with check (true)")
    assert not await conn.fetchval(
        "select has_table_privilege('app_writer', 'poller_job_changes', 'insert')")
    cursor = (await changes(conn, None))["cursor"]
    async with conn.transaction():
        await conn.execute("set local role app_writer")
        [job] = await add_jobs(conn, ["127.0.4.1"])
        await conn.execute("update jobs set cadence_seconds = 5 where id = $1", job)
    assert ids(await changes(conn, cursor)) == {job}


# The service: what a sync brings reaches the scheduler ----------------------------------

async def _synced_after(svc: Service, cond: Callable[[], bool]) -> None:
    """Wait until a sync started after this call made `cond` true."""
    syncs = count(svc, "syncs")
    async with asyncio.timeout(15):
        await svc.progress.wait_for(lambda: count(svc, "syncs") >= syncs + 2 and cond())


async def test_the_service_takes_up_every_change_with_one_full_read(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, standin: LatencyStandIn) -> None:
    kept, cancelled, edited = await add_jobs(conn, ["127.0.5.1", "127.0.5.2", "127.0.5.3"])
    svc = Service(Settings.from_env({**FAST, **await db_env(dsn), "PORT": str(free_port()),
                                     "LATENCY_API_URL": standin.url}))
    await svc.start()
    try:
        jobs = svc.scheduler.jobs
        await _synced_after(svc, lambda: set(jobs) == {kept, cancelled, edited})
        [new] = await add_jobs(conn, ["127.0.5.4"])
        await conn.execute("update jobs set status = 'cancelled' where id = $1", cancelled)
        await conn.execute("update jobs set cadence_seconds = 9, target_ip = '127.0.5.9' "
                           "where id = $1", edited)
        await _synced_after(svc, lambda: set(jobs) == {kept, edited, new}
                            and jobs[edited].cadence == 9
                            and jobs[edited].ip == "127.0.5.9")
        assert count(svc, "full_syncs") == 1  # the first; every later one read changes
        assert count(svc, "syncs") >= 4
    finally:
        assert await svc.stop()


@pytest.mark.slow  # seconds: out of the fast lane
async def test_a_topology_change_is_a_full_read_and_moves_jobs_between_replicas(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    fleet = "soundcheck/inc"
    await conn.fetchval("select poller_publish_topology($1, '{1}')", fleet)
    made = await add_jobs(conn, [f"127.0.6.{i}" for i in range(1, 41)])
    env = {**FAST, "DATABASE_URL": dsn, "LATENCY_API_URL": standin.url, "FLEET_NAME": fleet}
    a = Service(Settings.from_env({**env, "PORT": str(free_port()), "REPLICA_ID": "0"}))
    b = Service(Settings.from_env({**env, "PORT": str(free_port()), "REPLICA_ID": "1"}))
    await a.start()
    await b.start()
    try:
        await _synced_after(a, lambda: set(a.scheduler.jobs) == set(made))
        assert not b.scheduler.jobs  # outside the topology: nothing
        await conn.fetchval("select poller_publish_topology($1, '{2}')", fleet)
        await _synced_after(a, lambda: a.replica_counts == [2])
        await _synced_after(b, lambda: b.replica_counts == [2])
        shares = set(a.scheduler.jobs), set(b.scheduler.jobs)
        assert shares[0] | shares[1] == set(made) and not shares[0] & shares[1]
        assert shares[1]  # some moved to replica 1
        assert count(a, "full_syncs") == 2 and count(b, "full_syncs") >= 1
        # After the move, changes go to the replica that owns the job now.
        [new] = await add_jobs(conn, ["127.0.6.99"])
        owner = a if owns(new, 0, [2]) else b
        await _synced_after(owner, lambda: new in owner.scheduler.jobs)
    finally:
        assert await a.stop()
        assert await b.stop()


async def test_changes_are_taken_up_across_a_database_restart(
        own_pg: LocalPostgres, standin: LatencyStandIn) -> None:
    conn = await asyncpg.connect(own_pg.dsn)
    [first] = await add_jobs(conn, ["127.0.7.1"])
    svc = Service(Settings.from_env({**FAST, "DATABASE_URL": own_pg.dsn,
                                     "PORT": str(free_port()), "LATENCY_API_URL": standin.url}))
    await svc.start()
    try:
        await _synced_after(svc, lambda: first in svc.scheduler.jobs)
        await conn.close()
        await asyncio.to_thread(own_pg.stop, "immediate")
        await asyncio.to_thread(own_pg.start)
        conn = await asyncpg.connect(own_pg.dsn)
        [second] = await add_jobs(conn, ["127.0.7.2"])
        await conn.execute("update jobs set status = 'cancelled' where id = $1", first)
        await _synced_after(svc, lambda: set(svc.scheduler.jobs) == {second})
        assert count(svc, "full_syncs") == 1  # the cursor held across the restart
    finally:
        assert await svc.stop()
        await conn.close()


class _HeldPages(PostgresStore):
    """The direct store, with the pages after a full read's first held until released."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn, timeout_s=2.0)
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    async def jobs_in_buckets(self, buckets: Sequence[int], after: UUID | None,
                              limit: int) -> JobsPage:
        self.held.set()
        await self.release.wait()
        return await super().jobs_in_buckets(buckets, after, limit)


@pytest.mark.slow  # seconds: out of the fast lane
async def test_a_long_full_read_keeps_the_heartbeat_going(
        conn: asyncpg.Connection, dsn: str, standin: LatencyStandIn) -> None:
    """A full read that outlasts the failover timeout must not make the fleet take this
    replica for dead (its buckets would be taken over, and the others' moved in turn)."""
    fleet = "soundcheck/slowread"
    await conn.fetchval("select poller_publish_topology($1, '{1}')", fleet)
    await conn.execute("select poller_set_failover($1, 1)", fleet)
    made = await add_jobs(conn, [f"127.0.8.{i}" for i in range(1, 11)])
    store = _HeldPages(dsn)
    svc = Service(Settings.from_env({**FAST, "DATABASE_URL": dsn, "FLEET_NAME": fleet,
                                     "LATENCY_API_URL": standin.url, "REPLICA_ID": "0",
                                     "SYNC_PAGE_SIZE": "3", "PORT": str(free_port())}),
                  store=store)
    await svc.start()
    try:
        async with asyncio.timeout(15):
            await store.held.wait()  # the first page taken up, the second held
            beats = count(svc, "heartbeats")
            # Eight heartbeats at 200 ms: past the failover timeout of 1 s.
            await svc.progress.wait_for(lambda: count(svc, "heartbeats") >= beats + 8)
        assert len(svc.scheduler.jobs) == 3 and not svc.first_sync_done
        assert await conn.fetchval("select poller_live_replicas($1)", fleet) == [0]
        store.release.set()
        await _synced_after(svc, lambda: set(svc.scheduler.jobs) == set(made))
        assert count(svc, "full_syncs") == 1  # the heartbeats' answers were not taken up
    finally:
        store.release.set()
        assert await svc.stop()


async def test_the_sync_columns_come_once_not_once_per_job(conn: asyncpg.Connection) -> None:
    """The direct transport's sync answers carry the sync's own columns (bucket list,
    topology, cursor) on their first row only: on every row, a full read's page of 5,000
    jobs made the poller decode 5,000 copies of a 1,024-bucket list (140 MB)."""
    from poller.store.postgres import _BUCKETS_SQL, _CHANGES_SQL, _FLEET_SQL

    fleet = "soundcheck/head"
    await conn.fetchval("select poller_publish_topology($1, '{1}')", fleet)
    made = await add_jobs(conn, [f"127.0.9.{i}" for i in range(1, 31)])
    fleet_rows = await conn.fetch(_FLEET_SQL, fleet, 0, 0, [], None, False, 0, "t", 1000,
                                  None, [])
    change_rows = await conn.fetch(_CHANGES_SQL, ALL, None, 1000)
    page_rows = await conn.fetch(_BUCKETS_SQL, ALL, None, 1000)
    for rows, head in ((fleet_rows, "buckets"), (change_rows, "cursor"), (page_rows, "next")):
        assert {r["id"] for r in rows} == set(made)
        assert [r["n"] for r in rows] == list(range(1, 31))  # in the page's order
        assert all(r[head] is None for r in rows[1:])
    assert len(fleet_rows[0]["buckets"]) == BUCKETS and change_rows[0]["full"]
    empty = await conn.fetch(_CHANGES_SQL, [], None, 1000)  # no job: one row, the head
    assert len(empty) == 1 and empty[0]["id"] is None and empty[0]["cursor"] is not None
