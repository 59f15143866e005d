"""Failover with real poller processes: a graceful stop hands a replica's share over before
it stops pinging (zero missed slots), and a replica killed without warning has its share
taken over once its heartbeat is older than the fleet's failover timeout."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from poller.partition import owns
from tests.conftest import DbEnv
from tests.support.checks import due_between, load
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.processes import PollerProcess

pytestmark = pytest.mark.slow

FLEET = "soundcheck/fo"
FAILOVER_S = 2
ENV = {"POLL_INTERVAL_MS": "500", "BATCH_FLUSH_INTERVAL_MS": "200",
       "RETRY_MAX_BACKOFF_MS": "400", "DB_TIMEOUT_MS": "2000", "FLEET_NAME": FLEET,
       "SHUTDOWN_GRACE_MS": "10000"}


@pytest.fixture
async def fleet(conn: asyncpg.Connection, dsn: str, db_env: DbEnv,
                standin: LatencyStandIn) -> AsyncIterator[tuple[list[PollerProcess],
                                                                list[UUID]]]:
    ids = await add_jobs(conn, [f"127.0.4.{i}" for i in range(1, 61)], cadence_seconds=1)
    await conn.fetchval("select poller_publish_topology($1, '{3}')", FLEET)
    await conn.execute("select poller_set_failover($1, $2)", FLEET, FAILOVER_S)
    env = {**ENV, **await db_env(dsn), "LATENCY_API_URL": standin.url}
    procs = [PollerProcess({**env, "HOSTNAME": f"fo-{i}"}) for i in range(3)]
    try:
        for p in procs:
            await p.start()
        await asyncio.gather(*(p.synced() for p in procs))
        yield procs, ids
    finally:
        for p in procs:
            await p.kill()


async def _missed(conn: asyncpg.Connection, ids: list[UUID], start: float,
                  end: float) -> tuple[int, int]:
    """(slots due in [start, end] with no sample, slots due then) over the given jobs."""
    missed = due = 0
    for job in await load(conn, ids):
        slots = due_between(job, start, end)
        due += len(slots)
        missed += len(slots - set(job.seqs))
    return missed, due


async def test_a_graceful_stop_hands_over_before_it_stops(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection,
        standin: LatencyStandIn) -> None:
    procs, ids = fleet
    await asyncio.sleep(2)  # a settled fleet
    mine = [i for i in ids if owns(i, 1, [3])]
    stopped_at = time.time()
    procs[1].terminate()  # an eviction, a drain, a rolling update
    assert await procs[1].wait() == 0
    await procs[1].logged("handed over: the live replicas ping this replica's share")
    await asyncio.sleep(3)  # the others ping its share
    end = time.time()
    procs[0].terminate()
    procs[2].terminate()
    assert [await procs[0].wait(), await procs[2].wait()] == [0, 0]
    missed, due = await _missed(conn, mine, stopped_at - 2, end - 1.2)
    rows = await conn.fetchval("select count(*) from samples")
    duplicates = sum(standin.requests.values()) - rows
    print(f"\ngraceful stop: {missed} of {due} slots of the stopping replica's jobs missed; "
          f"{duplicates} duplicate pings absorbed by the unique key")
    assert missed == 0
    assert await conn.fetchval(
        "select count(*) from (select 1 from samples group by job_id, sequence_number "
        "having count(*) > 1) d") == 0


async def test_a_killed_replica_is_taken_over_after_the_failover_timeout(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection) -> None:
    procs, ids = fleet
    await asyncio.sleep(2)
    mine = [i for i in ids if owns(i, 1, [3])]
    killed_at = time.time()
    assert procs[1].proc is not None
    procs[1].proc.send_signal(signal.SIGKILL)  # an OOM kill, a lost node
    await procs[1].proc.wait()
    await asyncio.gather(procs[0].logged("live replicas: 0,2"),
                         procs[2].logged("live replicas: 0,2"))
    taken_at = time.time()
    await asyncio.sleep(4)
    end = time.time()
    for p in (procs[0], procs[2]):
        p.terminate()
        assert await p.wait() == 0
    window_missed, window_due = await _missed(conn, mine, killed_at, taken_at)
    after_missed, after_due = await _missed(conn, mine, taken_at + 1.2, end - 1.2)
    print(f"\nkill -9: takeover {taken_at - killed_at:.1f}s after the kill (failover "
          f"{FAILOVER_S}s, sync 0.5s); inside that window {window_missed} of {window_due} "
          f"slots missed, after it {after_missed} of {after_due}")
    assert after_missed == 0
    assert taken_at - killed_at < FAILOVER_S + 3  # failover timeout + a sync or two
