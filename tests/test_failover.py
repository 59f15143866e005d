"""Failover with real poller processes (a fleet of 4, jobs at 1-3 s cadences): a graceful
stop hands a replica's share over before it stops pinging (zero missed slots), and a
replica lost without warning (kill -9, SIGSTOP, cut from the database) has its share taken
over once its heartbeat is older than the fleet's failover timeout. Jobs that end during
an event are completed once, with their rollups."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from poller.localpg import free_port
from poller.partition import owns
from tests.conftest import DbEnv
from tests.support.checks import due_between, load
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.processes import PollerProcess
from tests.support.tcp_proxy import CuttableProxy

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
    ids = await add_jobs(conn, [f"127.0.4.{i}" for i in range(1, 81)],
                         cadence_seconds=[1 + i % 3 for i in range(80)])
    # Jobs that end during the test: completed once, with rollups, whatever happens.
    await add_jobs(conn, [f"127.0.5.{i}" for i in range(1, 9)], cadence_seconds=1,
                   duration_minutes=1, started_at=datetime.now(UTC) - timedelta(seconds=55))
    await conn.fetchval("select poller_publish_topology($1, '{4}')", FLEET)
    await conn.execute("select poller_set_failover($1, $2)", FLEET, FAILOVER_S)
    env = {**ENV, **await db_env(dsn), "LATENCY_API_URL": standin.url}
    procs = [PollerProcess({**env, "HOSTNAME": f"fo-{i}"}) for i in range(4)]
    try:
        for p in procs:
            await p.start()
        await asyncio.gather(*(p.synced() for p in procs))
        yield procs, ids
    finally:
        for p in procs:
            await p.kill()


async def _ending_jobs_completed_once(conn: asyncpg.Connection) -> None:
    """The jobs that ended during the event were completed (by whichever replica owned them
    then), and their rollups built once."""
    async with asyncio.timeout(15):
        # Polled, bounded by the timeout: a completion raises no event the test can await.
        while await conn.fetchval(  # noqa: ASYNC110
                "select count(*) from jobs where duration_minutes = 1 "
                "and status <> 'completed'"):
            await asyncio.sleep(0.2)
    # create_job_rollups ran once per job: one row per 5-minute bucket of its samples.
    assert await conn.fetchval(
        """select count(*) from jobs j where j.duration_minutes = 1 and
           (select count(*) from sample_rollups r where r.job_id = j.id)
           <> (select count(distinct floor(extract(epoch from s.recorded_at) / 300))
               from samples s where s.job_id = j.id)""") == 0


async def _others_see(procs: list[PollerProcess], live: str, since: list[int]) -> float:
    """Wait until replicas 0, 2 and 3 log the live set `live` after `since` (log positions);
    when that happened."""
    await asyncio.gather(*(procs[i].logged(f"live replicas: {live} ", since=since[i])
                           for i in (0, 2, 3)))
    return time.time()


def _marks(procs: list[PollerProcess]) -> list[int]:
    return [len(p.lines) for p in procs]


async def _missed(conn: asyncpg.Connection, ids: list[UUID], start: float,
                  end: float) -> tuple[int, int]:
    """(slots due in [start, end] with no sample, slots due then) over the given jobs."""
    missed = due = 0
    for job in await load(conn, ids):
        slots = due_between(job, start, end)
        due += len(slots)
        missed += len(slots - set(job.seqs))
    return missed, due


async def _covered_after_takeover(conn: asyncpg.Connection, mine: list[UUID], lost_at: float,
                                  taken_at: float, end: float, event: str) -> None:
    """Print and check, for a replica lost without warning: slots of its jobs missed before
    the others took over (the bounded window), and none missed after."""
    window_missed, window_due = await _missed(conn, mine, lost_at, taken_at)
    after_missed, after_due = await _missed(conn, mine, taken_at + 1.2, end - 1.2)
    print(f"\n{event}: takeover {taken_at - lost_at:.1f}s after it (failover {FAILOVER_S}s, "
          f"sync 0.5s); inside that window {window_missed} of {window_due} slots missed, "
          f"after it {after_missed} of {after_due}")
    assert after_missed == 0


async def test_a_graceful_stop_hands_over_before_it_stops(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection,
        standin: LatencyStandIn) -> None:
    procs, ids = fleet
    await asyncio.sleep(2)  # a settled fleet
    mine = [i for i in ids if owns(i, 1, [4])]
    stopped_at = time.time()
    procs[1].terminate()  # an eviction, a drain, a rolling update
    assert await procs[1].wait() == 0
    await procs[1].logged("handed over: the live replicas ping this replica's share")
    await asyncio.sleep(3)  # the others ping its share
    end = time.time()
    await _ending_jobs_completed_once(conn)
    assert await _stop_all([procs[0], procs[2], procs[3]]) == [0, 0, 0]
    await _nothing_missed(conn, mine, stopped_at - 2, end, standin,
                          "graceful stop (the stopping replica's jobs)")


async def test_a_killed_replica_is_taken_over_after_the_failover_timeout(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection) -> None:
    procs, ids = fleet
    await asyncio.sleep(2)
    mine = [i for i in ids if owns(i, 1, [4])]
    killed_at, marks = time.time(), _marks(procs)
    assert procs[1].proc is not None
    procs[1].proc.send_signal(signal.SIGKILL)  # an OOM kill, a lost node
    await procs[1].proc.wait()
    taken_at = await _others_see(procs, "0,2,3", marks)
    await asyncio.sleep(4)
    end = time.time()
    await _ending_jobs_completed_once(conn)
    assert await _stop_all([procs[0], procs[2], procs[3]]) == [0, 0, 0]
    await _covered_after_takeover(conn, mine, killed_at, taken_at, end, "kill -9")
    assert taken_at - killed_at < FAILOVER_S + 3  # failover timeout + a sync or two


async def _stop_all(procs: list[PollerProcess]) -> list[int]:
    for p in procs:
        if p.proc is not None and p.proc.returncode is None:
            p.terminate()
    return [await p.wait() for p in procs if p.proc is not None]


async def _no_duplicate_rows(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval(
        "select count(*) from (select 1 from samples group by job_id, sequence_number "
        "having count(*) > 1) d") == 0


async def _nothing_missed(conn: asyncpg.Connection, ids: list[UUID], start: float,
                          end: float, standin: LatencyStandIn, event: str) -> None:
    """Print and check: every slot due in the window has one row; duplicate pings (both
    owners pinged) were absorbed by the unique key."""
    missed, due = await _missed(conn, ids, start, end - 1.2)
    rows = await conn.fetchval("select count(*) from samples")
    print(f"\n{event}: {missed} of {due} slots missed; "
          f"{sum(standin.requests.values()) - rows} duplicate pings absorbed")
    assert missed == 0
    await _no_duplicate_rows(conn)


async def test_a_rolling_update_misses_no_slot(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection,
        standin: LatencyStandIn) -> None:
    # What a StatefulSet's rolling update does to each pod in turn: SIGTERM, wait for the
    # exit, start the new pod with the same name, wait until it is ready (first sync).
    procs, ids = fleet
    await asyncio.sleep(2)
    started = time.time()
    for i in (3, 2, 1, 0):
        procs[i].terminate()
        assert await procs[i].wait() == 0
        procs[i] = PollerProcess(procs[i].env | {"PORT": str(free_port())})
        await procs[i].start()
        await procs[i].synced()
    await asyncio.sleep(2)
    end = time.time()
    await _ending_jobs_completed_once(conn)
    assert await _stop_all(procs) == [0, 0, 0, 0]
    await _nothing_missed(conn, ids, started, end, standin, "rolling update of 4 pods")


async def test_a_frozen_replica_is_covered_and_gives_back_when_it_wakes(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection) -> None:
    procs, ids = fleet
    await asyncio.sleep(2)
    mine = [i for i in ids if owns(i, 1, [4])]
    assert procs[1].proc is not None
    frozen_at, marks = time.time(), _marks(procs)
    procs[1].proc.send_signal(signal.SIGSTOP)  # a stuck node: alive, silent
    taken_at = await _others_see(procs, "0,2,3", marks)
    await asyncio.sleep(3)
    marks = _marks(procs)
    procs[1].proc.send_signal(signal.SIGCONT)
    await _others_see(procs, "0,1,2,3", marks)  # it is back: its share is given back
    await asyncio.sleep(2)
    end = time.time()
    await _ending_jobs_completed_once(conn)
    assert await _stop_all(procs) == [0, 0, 0, 0]
    await _covered_after_takeover(conn, mine, frozen_at, taken_at, end, "SIGSTOP")
    await _no_duplicate_rows(conn)


async def test_two_pods_with_one_ordinal_do_no_harm(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection,
        standin: LatencyStandIn) -> None:
    # The node of pf-1 comes back while its replacement runs: two processes, one ordinal.
    procs, ids = fleet
    await asyncio.sleep(1)
    twin = PollerProcess(procs[1].env | {"PORT": str(free_port())})
    await twin.start()
    await twin.synced()
    started = time.time()
    await asyncio.sleep(4)
    end = time.time()
    await _ending_jobs_completed_once(conn)
    assert await _stop_all([*procs, twin]) == [0, 0, 0, 0, 0]
    await _nothing_missed(conn, ids, started, end, standin, "two pods with ordinal 1")


async def test_without_takeover_a_killed_replica_leaves_its_share_unpinged(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection) -> None:
    # The same kill -9 with the takeover switched off (a failover timeout of an hour), for
    # comparison: the share stays unpinged until the pod is back.
    procs, ids = fleet
    await conn.execute("select poller_set_failover($1, 3600)", FLEET)
    await asyncio.sleep(2)
    mine = [i for i in ids if owns(i, 1, [4])]
    assert procs[1].proc is not None
    killed_at = time.time()
    procs[1].proc.send_signal(signal.SIGKILL)
    await procs[1].proc.wait()
    await asyncio.sleep(FAILOVER_S + 4)
    end = time.time()
    assert await _stop_all([procs[0], procs[2], procs[3]]) == [0, 0, 0]
    missed, due = await _missed(conn, mine, killed_at + FAILOVER_S + 1.2, end - 1.2)
    print(f"\nkill -9 without takeover: {missed} of {due} slots missed after "
          f"{FAILOVER_S}s (all of them, until the pod is back)")
    assert missed == due > 0


async def test_a_replica_cut_from_the_database_is_covered(
        fleet: tuple[list[PollerProcess], list[UUID]], conn: asyncpg.Connection,
        dsn: str) -> None:
    procs, ids = fleet
    if "DATABASE_URL" not in procs[1].env:
        pytest.skip("the cut is a TCP proxy in front of Postgres: direct transport only")
    # Replica 1 again, through a proxy that can cut it off like a network partition.
    proxy = CuttableProxy(int(dsn.rsplit(":", 1)[1].split("/", 1)[0]))
    await proxy.start()
    procs[1].terminate()
    assert await procs[1].wait() == 0
    procs[1] = PollerProcess(procs[1].env | {
        "PORT": str(free_port()),
        "DATABASE_URL": dsn.replace(dsn.rsplit(":", 1)[1].split("/", 1)[0], str(proxy.port))})
    try:
        await procs[1].start()
        await procs[1].synced()
        await asyncio.sleep(2)
        mine = [i for i in ids if owns(i, 1, [4])]
        cut_at, marks = time.time(), _marks(procs)
        proxy.cut()  # it pings on and buffers; its heartbeat stops
        taken_at = await _others_see(procs, "0,2,3", marks)
        await asyncio.sleep(3)
        marks = _marks(procs)
        proxy.heal()
        await _others_see(procs, "0,1,2,3", marks)  # back: it writes what it buffered
        await asyncio.sleep(2)
        end = time.time()
        await _ending_jobs_completed_once(conn)
        assert await _stop_all(procs) == [0, 0, 0, 0]
    finally:
        await proxy.stop()
    await _covered_after_takeover(conn, mine, cut_at, taken_at, end, "cut from the database")
    await _no_duplicate_rows(conn)
