"""Failover with real poller processes (a fleet of 4, jobs at 1-3 s cadences): a graceful
stop hands a replica's share over before it stops pinging (zero missed slots), and a
replica lost without warning (kill -9, SIGSTOP, cut from the database) has its share taken
over once its heartbeat is older than the fleet's failover timeout. Jobs that end during
an event are completed once, with their rollups.

Every event also runs with the takeover switched off (`REPLICA_COUNT=4`, no fleet: fixed
ownership, no handover, no failover), on the direct transport, for comparison; both are
printed side by side at the end of the run."""

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
from tests.support import report
from tests.support.checks import due_between, load
from tests.support.db import add_jobs
from tests.support.latency_standin import LatencyStandIn
from tests.support.processes import PollerProcess
from tests.support.tcp_proxy import CuttableProxy

# Takeover on with both transports; off (the comparison) with the direct one.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize(
    ("db_env", "takeover"), [("postgres", True), ("supabase", True), ("postgres", False)],
    indirect=["db_env"], ids=["postgres", "supabase", "takeover-off"])]

FLEET = "soundcheck/fo"
FAILOVER_S = 2
OUTAGE_S = FAILOVER_S + 3  # how long a frozen or cut replica stays so
REPLACE_S = 1.0  # a pod replaced by its StatefulSet: scheduled, started (seconds on a cluster)
ENV = {"POLL_INTERVAL_MS": "500", "BATCH_FLUSH_INTERVAL_MS": "200",
       "RETRY_MAX_BACKOFF_MS": "400", "DB_TIMEOUT_MS": "2000", "SHUTDOWN_GRACE_MS": "10000"}
TABLE = (f"failover events, fleet of 4, failover timeout {FAILOVER_S}s: "
         "slots missed with the takeover on | off")


Fleet = tuple[list[PollerProcess], list[UUID], bool]


@pytest.fixture
async def fleet(conn: asyncpg.Connection, dsn: str, db_env: DbEnv, standin: LatencyStandIn,
                takeover: bool) -> AsyncIterator[Fleet]:
    ids = await add_jobs(conn, [f"127.0.4.{i}" for i in range(1, 81)],
                         cadence_seconds=[1 + i % 3 for i in range(80)])
    # Jobs that end during the test: completed once, with rollups, whatever happens.
    await add_jobs(conn, [f"127.0.5.{i}" for i in range(1, 9)], cadence_seconds=1,
                   duration_minutes=1, started_at=datetime.now(UTC) - timedelta(seconds=55))
    env = {**ENV, **await db_env(dsn), "LATENCY_API_URL": standin.url}
    if takeover:
        await conn.fetchval("select poller_publish_topology($1, '{4}')", FLEET)
        await conn.execute("select poller_set_failover($1, $2)", FLEET, FAILOVER_S)
        env["FLEET_NAME"] = FLEET
    else:
        env["REPLICA_COUNT"] = "4"
    procs = [PollerProcess({**env, "HOSTNAME": f"fo-{i}"}) for i in range(4)]
    try:
        for p in procs:
            await p.start()
        await asyncio.gather(*(p.synced() for p in procs))
        await asyncio.sleep(2)  # a settled fleet: every replica has pinged for a while
        yield procs, ids, takeover
    finally:
        for p in procs:
            await p.kill()


def _share(ids: list[UUID], replica: int) -> list[UUID]:
    return [i for i in ids if owns(i, replica, [4])]


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


async def _stop_all(procs: list[PollerProcess]) -> list[int]:
    for p in procs:
        if p.proc is not None and p.proc.returncode is None:
            p.terminate()
    return [await p.wait() for p in procs if p.proc is not None]


async def _no_duplicate_rows(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval(
        "select count(*) from (select 1 from samples group by job_id, sequence_number "
        "having count(*) > 1) d") == 0


async def _end(fleet: Fleet, conn: asyncpg.Connection, running: list[PollerProcess]) -> None:
    """The end of an event: with the takeover on, the jobs that ended meanwhile were
    completed once; every process still running stops cleanly; no duplicate rows."""
    if fleet[2]:
        await _ending_jobs_completed_once(conn)
    assert await _stop_all(running) == [0] * len(running)
    await _no_duplicate_rows(conn)


def _record(event: str, takeover: bool, conn_env: dict[str, str], text: str) -> None:
    if "SUPABASE_URL" in conn_env:
        return  # one row per event and mode: the direct transport's
    report.record(TABLE, f"{event:<38} {'on ' if takeover else 'off'} | {text}")


async def _graceful(fleet: Fleet, conn: asyncpg.Connection, standin: LatencyStandIn,
                    event: str, ids: list[UUID], start: float, end: float) -> tuple[int, int]:
    """Print and record the slots missed over the window; with the takeover on, none."""
    _, _, takeover = fleet
    missed, due = await _missed(conn, ids, start, end - 1.2)
    rows = await conn.fetchval("select count(*) from samples")
    duplicates = sum(standin.requests.values()) - rows
    text = f"{missed} of {due} missed; {duplicates} duplicate pings absorbed"
    print(f"\n{event}, takeover {'on' if takeover else 'off'}: {text}")
    _record(event, takeover, fleet[0][0].env, text)
    if takeover:
        assert missed == 0
    return missed, due


async def _lost(fleet: Fleet, conn: asyncpg.Connection, event: str, mine: list[UUID],
                lost_at: float, taken_at: float | None, end: float) -> tuple[int, int]:
    """Print and record, for a replica lost without warning, the slots of its jobs missed;
    with the takeover on, only inside the window before the others took over."""
    _, _, takeover = fleet
    missed, due = await _missed(conn, mine, lost_at, end - 1.2)
    text = f"{missed} of {due} of its slots missed"
    if taken_at is not None:
        window_missed, window_due = await _missed(conn, mine, lost_at, taken_at)
        after_missed, after_due = await _missed(conn, mine, taken_at + 1.2, end - 1.2)
        text += (f": {window_missed} of {window_due} before the takeover "
                 f"{taken_at - lost_at:.1f}s after it, {after_missed} of {after_due} after")
        assert after_missed == 0
        assert taken_at - lost_at < FAILOVER_S + 3  # failover timeout + a sync or two
    print(f"\n{event}, takeover {'on' if takeover else 'off'}: {text}")
    _record(event, takeover, fleet[0][0].env, text)
    return missed, due


async def test_a_graceful_stop_hands_over_before_it_stops(
        fleet: Fleet, conn: asyncpg.Connection, standin: LatencyStandIn) -> None:
    procs, ids, takeover = fleet
    stopped_at = time.time()
    procs[1].terminate()  # an eviction, a drain, a scale-down
    assert await procs[1].wait() == 0
    if takeover:
        await procs[1].logged("handed over: the live replicas ping this replica's share")
    await asyncio.sleep(3)  # the window measured: the others ping its share, or nobody does
    end = time.time()
    await _end(fleet, conn, [procs[0], procs[2], procs[3]])
    missed, _ = await _graceful(fleet, conn, standin, "graceful stop of one pod (its jobs)",
                                _share(ids, 1), stopped_at - 2, end)
    assert takeover or missed > 0


async def test_a_rolling_update_misses_no_slot(
        fleet: Fleet, conn: asyncpg.Connection, standin: LatencyStandIn) -> None:
    # What a StatefulSet's rolling update does to each pod in turn: SIGTERM, wait for the
    # exit, the pod is replaced (REPLACE_S), the new pod starts and is ready (first sync).
    procs, ids, takeover = fleet
    started = time.time()
    for i in (3, 2, 1, 0):
        procs[i].terminate()
        assert await procs[i].wait() == 0
        await asyncio.sleep(REPLACE_S)  # stands for the pod replacement
        procs[i] = PollerProcess(procs[i].env | {"PORT": str(free_port())})
        await procs[i].start()
        await procs[i].synced()
    await asyncio.sleep(2)
    end = time.time()
    await _end(fleet, conn, procs)
    missed, _ = await _graceful(fleet, conn, standin, "rolling update of the 4 pods", ids,
                                started, end)
    assert takeover or missed > 0


async def test_two_pods_with_one_ordinal_do_no_harm(
        fleet: Fleet, conn: asyncpg.Connection, standin: LatencyStandIn) -> None:
    # The node of fo-1 comes back while its replacement runs: two processes, one ordinal.
    procs, ids, _ = fleet
    twin = PollerProcess(procs[1].env | {"PORT": str(free_port())})
    await twin.start()
    await twin.synced()
    started = time.time()
    await asyncio.sleep(4)
    end = time.time()
    await _end(fleet, conn, [*procs, twin])
    await _graceful(fleet, conn, standin, "two pods with ordinal 1 for 4s", ids, started, end)


async def test_a_killed_replica_is_taken_over_after_the_failover_timeout(
        fleet: Fleet, conn: asyncpg.Connection) -> None:
    procs, ids, takeover = fleet
    killed_at, marks = time.time(), _marks(procs)
    assert procs[1].proc is not None
    procs[1].proc.send_signal(signal.SIGKILL)  # an OOM kill, a lost node
    await procs[1].proc.wait()
    taken_at = await _others_see(procs, "0,2,3", marks) if takeover else None
    await asyncio.sleep(max(0.0, killed_at + OUTAGE_S + 3 - time.time()))
    end = time.time()
    await _end(fleet, conn, [procs[0], procs[2], procs[3]])
    missed, due = await _lost(fleet, conn, "kill -9 of one pod", _share(ids, 1), killed_at,
                              taken_at, end)
    assert takeover or missed == due > 0  # off: nobody pings its share until it is back


async def test_a_frozen_replica_is_covered_and_gives_back_when_it_wakes(
        fleet: Fleet, conn: asyncpg.Connection) -> None:
    procs, ids, takeover = fleet
    assert procs[1].proc is not None
    frozen_at, marks = time.time(), _marks(procs)
    procs[1].proc.send_signal(signal.SIGSTOP)  # a stuck node: alive, silent
    taken_at = await _others_see(procs, "0,2,3", marks) if takeover else None
    await asyncio.sleep(max(0.0, frozen_at + OUTAGE_S - time.time()))
    marks = _marks(procs)
    procs[1].proc.send_signal(signal.SIGCONT)
    if takeover:
        await _others_see(procs, "0,1,2,3", marks)  # it is back: its share is given back
    await asyncio.sleep(2)
    end = time.time()
    await _end(fleet, conn, procs)
    missed, _ = await _lost(fleet, conn, f"SIGSTOP of one pod, SIGCONT {OUTAGE_S}s later",
                            _share(ids, 1), frozen_at, taken_at, end)
    assert takeover or missed > 0  # off: it skips what it slept through (not recorded)


async def test_a_replica_cut_from_the_database_is_covered(
        fleet: Fleet, conn: asyncpg.Connection, dsn: str) -> None:
    procs, ids, takeover = fleet
    if "DATABASE_URL" not in procs[1].env:
        pytest.skip("the cut is a TCP proxy in front of Postgres: direct transport only")
    # Replica 1 again, through a proxy that can cut it off like a network partition.
    port = dsn.rsplit(":", 1)[1].split("/", 1)[0]
    proxy = CuttableProxy(int(port))
    await proxy.start()
    procs[1].terminate()
    assert await procs[1].wait() == 0
    procs[1] = PollerProcess(procs[1].env | {"PORT": str(free_port()),
                                             "DATABASE_URL": dsn.replace(port, str(proxy.port))})
    try:
        await procs[1].start()
        await procs[1].synced()
        await asyncio.sleep(2)
        cut_at, marks = time.time(), _marks(procs)
        proxy.cut()  # it pings on and buffers; its heartbeat stops
        taken_at = await _others_see(procs, "0,2,3", marks) if takeover else None
        await asyncio.sleep(max(0.0, cut_at + OUTAGE_S - time.time()))
        marks = _marks(procs)
        proxy.heal()
        if takeover:
            await _others_see(procs, "0,1,2,3", marks)  # back: it writes what it buffered
        else:
            await procs[1].logged(" synced: ", since=marks[1])
        await asyncio.sleep(2)
        end = time.time()
        await _end(fleet, conn, procs)
    finally:
        await proxy.stop()
    missed, _ = await _lost(fleet, conn, f"one pod cut from the database for {OUTAGE_S}s",
                            _share(ids, 1), cut_at, taken_at, end)
    # Either way it pinged on and wrote its buffer once healed: nothing is missed.
    assert missed == 0
