"""Topology handover through the SQL API: pollers learn the fleet's size with each sync,
report what they apply (heartbeats), and never restart to change ownership."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from poller.localpg import free_port
from poller.partition import bucket, owned_buckets, owns
from poller.service import Service
from poller.settings import Settings
from tests.conftest import DbEnv
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.partition_model import owned_buckets_live

FLEET = "soundcheck/pf"


async def publish(conn: asyncpg.Connection, counts: list[int]) -> int:
    return int(await conn.fetchval("select poller_publish_topology($1, $2)", FLEET, counts))


async def test_publish_moves_the_epoch_only_on_a_change(conn: asyncpg.Connection) -> None:
    assert await publish(conn, [3]) == 1
    assert await publish(conn, [3]) == 1
    assert await publish(conn, [3, 4]) == 2
    assert await publish(conn, [4]) == 3
    for bad in ([], [0], [1, 2, 3]):
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await publish(conn, bad)


async def test_sync_fleet_records_a_heartbeat_and_owns_the_union(
        conn: asyncpg.Connection) -> None:
    ids = await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 101)])
    with pytest.raises(asyncpg.NoDataFoundError, match="no topology published"):
        await conn.fetchval("select poller_sync_fleet($1, 0, 0, 'v')", FLEET)
    await publish(conn, [3, 4])
    out = json.loads(await conn.fetchval("select poller_sync_fleet($1, 3, 7, '0.1.0')", FLEET))
    assert out["counts"] == [3, 4] and out["epoch"] == 1
    got = {row["id"] for row in out["jobs"]}
    assert got == {str(i) for i in ids if owns(i, 3, [3, 4])}  # replica 3 exists only in 4
    state = json.loads(await conn.fetchval("select poller_fleet_state($1)", FLEET))
    assert state["replicas"][0] | {"age_s": 0} == {
        "replica_id": 3, "epoch": 1, "counts": [3, 4], "owned_jobs": 7, "version": "0.1.0",
        "leaving": False, "age_s": 0}
    assert state["running_jobs"] == 100 and state["stale_jobs"] == 0


async def test_the_heartbeat_reports_the_applied_topology_not_the_served_one(
        conn: asyncpg.Connection) -> None:
    # Before: the heartbeat recorded the epoch the database served, so a reply lost on its
    # way let the operator shrink while the pod still ran the old topology.
    ids = await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 41)])
    await publish(conn, [2])
    await publish(conn, [2, 1])  # epoch 2, being handed over
    out = json.loads(await conn.fetchval(
        "select poller_fleet_sync_live($1, 0, 1, '{2}', now(), false, 5, 'v', 1000)", FLEET))
    assert (out["counts"], out["epoch"]) == ([2, 1], 2)  # served: the new topology …
    assert {row["id"] for row in out["jobs"]} == {str(i) for i in ids}  # … replica 0's union
    state = json.loads(await conn.fetchval("select poller_fleet_state($1)", FLEET))
    assert [(r["epoch"], r["counts"]) for r in state["replicas"]] == [(1, [2])]  # applied


def _ids_in_buckets(buckets: set[int], n: int) -> list[uuid.UUID]:
    rng = random.Random(7)
    found: list[uuid.UUID] = []
    for _ in range(5_000_000):  # bounded; about 1 in 340 falls in three of 1024 buckets
        candidate = uuid.UUID(int=rng.getrandbits(128), version=4)
        if bucket(candidate) in buckets:
            found.append(candidate)
            if len(found) == n:
                return found
    raise AssertionError("no ids found")


async def test_job_pages_cover_every_owned_job_once_in_bucket_order(
        conn: asyncpg.Connection) -> None:
    # 50 jobs in their own buckets, and 30 crowded into three: pages end inside a bucket.
    crowded = _ids_in_buckets({5, 6, 900}, 30)
    ids = await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 51)])
    ids += await add_jobs(conn, ["127.0.1.1"] * 30, ids=crowded)
    seen: list[str] = []
    after = None
    for _ in range(20):  # bounded: 80 jobs in pages of 7
        page = json.loads(await conn.fetchval(
            "select poller_jobs_page(0, '{1}', $1, 7)", after))
        assert len(page["jobs"]) == 7 or page["next"] is None
        seen += [row["id"] for row in page["jobs"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [str(i) for i in sorted(ids, key=lambda i: (bucket(i), str(i)))]
    # The bucket filter agrees with the Python partition (and soundcheck_bucket).
    page = json.loads(await conn.fetchval("select poller_jobs_page(1, '{3}', null, 100)"))
    assert {row["id"] for row in page["jobs"]} == {str(i) for i in ids if owns(i, 1, [3])}
    with pytest.raises(asyncpg.InvalidParameterValueError, match="p_limit"):
        await conn.fetchval("select poller_jobs_page(0, '{1}', null, 0)")


async def test_stale_jobs_are_running_jobs_without_a_recent_sample(
        conn: asyncpg.Connection) -> None:
    fresh, stale, never = await add_jobs(conn, ["127.0.0.1"] * 3, cadence_seconds=10)
    await conn.execute("update jobs set started_at = now() - interval '1 hour'")
    await conn.execute("update jobs set last_ping_at = now() - interval '5 seconds' "
                       "where id = $1", fresh)
    await conn.execute("update jobs set last_ping_at = now() - interval '25 seconds' "
                       "where id = $1", stale)
    state = json.loads(await conn.fetchval("select poller_fleet_state($1)", FLEET))
    assert state["stale_jobs"] == 2  # `stale` and `never`, not `fresh`
    del never


async def test_pollers_follow_the_published_topology_without_restarting(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, standin: LatencyStandIn) -> None:
    ids = await add_jobs(conn, [f"127.0.1.{i}" for i in range(1, 121)], cadence_seconds=60)
    await publish(conn, [1])
    env = {**await db_env(dsn), "LATENCY_API_URL": standin.url, "FLEET_NAME": FLEET,
           "POLL_INTERVAL_MS": "100", "BATCH_FLUSH_INTERVAL_MS": "100"}
    a = Service(Settings.from_env({**env, "HOSTNAME": "pf-0", "PORT": str(free_port())}))
    b = Service(Settings.from_env({**env, "HOSTNAME": "pf-1", "PORT": str(free_port())}))
    await a.start()
    await b.start()

    async def both(cond: Callable[[Service], bool]) -> None:
        async with asyncio.timeout(10):
            await a.progress.wait_for(lambda: cond(a))
            await b.progress.wait_for(lambda: cond(b))

    def count(svc: Service) -> float:
        return svc.metrics.value("soundcheck_poller_syncs_total")

    def owned(svc: Service) -> set[object]:
        return set(svc.scheduler.jobs)

    try:
        await both(lambda s: s.replica_counts == [1] and s.first_sync_done)
        assert owned(a) == set(ids) and owned(b) == set()  # replica 1 is beyond [1]
        await publish(conn, [1, 2])
        await both(lambda s: s.replica_counts == [1, 2])
        assert owned(a) == set(ids)  # overlap: the old share kept …
        assert owned(b) == {i for i in ids if owns(i, 1, [2])}  # … and the new one taken
        await publish(conn, [2])
        await both(lambda s: s.replica_counts == [2])
        assert owned(a) | owned(b) == set(ids) and not owned(a) & owned(b)  # a partition
        # Heartbeats report the topology applied (by the previous sync), so epoch 3 shows
        # from the sync after the one that took it up.
        syncs = (count(a), count(b))
        await both(lambda s: count(s) >= syncs[s is b] + 1)
        state = json.loads(await conn.fetchval("select poller_fleet_state($1)", FLEET))
        assert {(r["replica_id"], r["epoch"], tuple(r["counts"])) for r in state["replicas"]
                } == {(0, 3, (2,)), (1, 3, (2,))}
    finally:
        assert await a.stop() and await b.stop()


async def test_a_starting_fleet_shares_its_buckets_from_the_first_sync(
        conn: asyncpg.Connection) -> None:
    """Before, the first replica up saw no other live, took every bucket and pinged every
    job until its next sync (at a million jobs, minutes of overflowing buffers)."""
    await publish(conn, [3])
    await conn.execute("select poller_set_failover($1, 15)", FLEET)

    async def sync(replica: int, applied_at: datetime | None) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(await conn.fetchval(
            "select poller_fleet_sync_live($1, $2, 1, '{3}', $3, false, 0, 'v', 1)",
            FLEET, replica, applied_at))
        return out

    first = await sync(0, None)  # a new process: nothing applied yet
    assert first["live"] == [0, 1, 2]  # 1 and 2 not seen yet, but expected
    assert set(first["buckets"]) == owned_buckets(0, [3])
    applied = datetime.fromisoformat(first["now"])
    assert (await sync(1, None))["live"] == [0, 1, 2]
    assert (await sync(0, applied))["live"] == [0, 1, 2]  # its start is kept once running
    assert (await sync(1, applied))["live"] == [0, 1, 2]

    # One failover timeout after the start, replica 2 still missing: taken over.
    await conn.execute("update poller_heartbeats set started_at = started_at - "
                       "interval '20 s' where fleet = $1", FLEET)
    later = await sync(0, applied)
    assert later["live"] == [0, 1]
    assert set(later["buckets"]) == owned_buckets_live(0, [3], {0, 1})

    # Replica 1 restarts in the running fleet: a new start, but no grace for replica 2.
    assert (await sync(1, None))["live"] == [0, 1]
    starts = dict(await conn.fetch(
        "select replica_id, started_at > now() - interval '1 s' from poller_heartbeats "
        "where fleet = $1", FLEET))
    assert starts == {0: False, 1: True}
