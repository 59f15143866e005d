"""Failover events on a fleet of four real poller processes, measured: what tests/test_failover.py
asserts (the takeover on) and bench/bench_takeover.py compares (on against off).

A fleet: 80 jobs at 1-3 s cadences, 8 more that end during the event; with the takeover on,
a published topology of 4 and a failover timeout of FAILOVER_S (FLEET_NAME); off, fixed
ownership by REPLICA_COUNT=4 (no handover, no failover). Each event returns an `Outcome`:
the slots missed and due, and for a replica lost without warning, when the others took
over and what was missed before and after.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg

from poller.localpg import free_port
from poller.partition import owns
from tests.support.checks import due_between, load
from tests.support.db import add_jobs
from tests.support.processes import PollerProcess
from tests.support.tcp_proxy import CuttableProxy

FLEET = "soundcheck/fo"
FAILOVER_S = 2
OUTAGE_S = FAILOVER_S + 3  # how long a frozen or cut replica stays so
REPLACE_S = 1.0  # a pod replaced by its StatefulSet: scheduled, started (seconds on a cluster)
SETTLE_S = 1.2  # the end of a window: pings of its last slots still on their way
ENV = {"POLL_INTERVAL_MS": "500", "BATCH_FLUSH_INTERVAL_MS": "200",
       "RETRY_MAX_BACKOFF_MS": "400", "DB_TIMEOUT_MS": "2000", "SHUTDOWN_GRACE_MS": "10000"}


@dataclass
class Fleet:
    procs: list[PollerProcess]
    ids: list[UUID]  # the 80 long jobs
    takeover: bool
    conn: asyncpg.Connection
    requests: dict[str, int]  # pings the latency stand-in answered, by target

    def share(self, replica: int) -> list[UUID]:
        return [i for i in self.ids if owns(i, replica, [4])]

    def marks(self) -> list[int]:
        return [len(p.lines) for p in self.procs]

    async def others_see(self, live: str, since: list[int]) -> float:
        """Wait until replicas 0, 2 and 3 log the live set `live` after `since`; when."""
        await asyncio.gather(*(self.procs[i].logged(f"live replicas: {live} ", since=since[i])
                               for i in (0, 2, 3)))
        return time.time()

    async def close(self) -> None:
        for p in self.procs:
            await p.kill()


@dataclass
class Outcome:
    event: str
    missed: int
    due: int
    duplicates: int | None = None  # pings absorbed by the unique key (graceful events)
    taken_after_s: float | None = None  # lost replicas, takeover on
    missed_before_takeover: int | None = None
    due_before_takeover: int | None = None
    missed_after_takeover: int | None = None
    due_after_takeover: int | None = None

    @property
    def text(self) -> str:
        if self.duplicates is not None:
            return (f"{self.missed} of {self.due} missed; {self.duplicates} duplicate pings "
                    "absorbed")
        text = f"{self.missed} of {self.due} of its slots missed"
        if self.taken_after_s is not None:
            text += (f": {self.missed_before_takeover} of {self.due_before_takeover} before "
                     f"the takeover {self.taken_after_s:.1f}s after it, "
                     f"{self.missed_after_takeover} of {self.due_after_takeover} after")
        return text


async def start_fleet(conn: asyncpg.Connection, db: dict[str, str], latency_url: str,
                      requests: dict[str, int], takeover: bool) -> Fleet:
    ids = await add_jobs(conn, [f"127.0.4.{i}" for i in range(1, 81)],
                         cadence_seconds=[1 + i % 3 for i in range(80)])
    # Jobs that end during the event: completed once, with rollups, whatever happens.
    await add_jobs(conn, [f"127.0.5.{i}" for i in range(1, 9)], cadence_seconds=1,
                   duration_minutes=1, started_at=datetime.now(UTC) - timedelta(seconds=55))
    env = {**ENV, **db, "LATENCY_API_URL": latency_url}
    if takeover:
        await conn.fetchval("select poller_publish_topology($1, '{4}')", FLEET)
        await conn.execute("select poller_set_failover($1, $2)", FLEET, FAILOVER_S)
        env["FLEET_NAME"] = FLEET
    else:
        env["REPLICA_COUNT"] = "4"
    fleet = Fleet([PollerProcess({**env, "HOSTNAME": f"fo-{i}"}) for i in range(4)], ids,
                  takeover, conn, requests)
    try:
        for p in fleet.procs:
            await p.start()
        await asyncio.gather(*(p.synced() for p in fleet.procs))
        await asyncio.sleep(2)  # a settled fleet: every replica has pinged for a while
    except BaseException:
        await fleet.close()
        raise
    return fleet


async def missed_between(conn: asyncpg.Connection, ids: list[UUID], start: float,
                         end: float) -> tuple[int, int]:
    """(slots due in [start, end] with no sample, slots due then) over the given jobs."""
    missed = due = 0
    for job in await load(conn, ids):
        slots = due_between(job, start, end)
        due += len(slots)
        missed += len(slots - set(job.seqs))
    return missed, due


async def stop_all(procs: list[PollerProcess]) -> list[int]:
    for p in procs:
        if p.proc is not None and p.proc.returncode is None:
            p.terminate()
    return [await p.wait() for p in procs if p.proc is not None]


async def _graceful(fleet: Fleet, event: str, ids: list[UUID], start: float,
                    end: float) -> Outcome:
    missed, due = await missed_between(fleet.conn, ids, start, end - SETTLE_S)
    rows = await fleet.conn.fetchval("select count(*) from samples")
    return Outcome(event, missed, due, duplicates=sum(fleet.requests.values()) - rows)


async def _lost(fleet: Fleet, event: str, mine: list[UUID], lost_at: float,
                taken_at: float | None, end: float) -> Outcome:
    missed, due = await missed_between(fleet.conn, mine, lost_at, end - SETTLE_S)
    out = Outcome(event, missed, due)
    if taken_at is not None:
        out.taken_after_s = taken_at - lost_at
        out.missed_before_takeover, out.due_before_takeover = await missed_between(
            fleet.conn, mine, lost_at, taken_at)
        out.missed_after_takeover, out.due_after_takeover = await missed_between(
            fleet.conn, mine, taken_at + SETTLE_S, end - SETTLE_S)
    return out


# The events. Each hands the processes still running to `finish` (which checks what it
# checks and stops them) before it measures: samples are counted once they are written.
Finish = Callable[[list[PollerProcess]], Awaitable[None]]


async def graceful_stop(fleet: Fleet, finish: Finish) -> Outcome:
    """SIGTERM of replica 1: an eviction, a drain, a scale-down."""
    procs = fleet.procs
    stopped_at = time.time()
    procs[1].terminate()
    assert await procs[1].wait() == 0
    if fleet.takeover:
        await procs[1].logged("handed over: the live replicas ping this replica's share")
    await asyncio.sleep(3)  # the window measured: the others ping its share, or nobody does
    end = time.time()
    await finish([procs[0], procs[2], procs[3]])
    return await _graceful(fleet, "graceful stop of one pod (its jobs)", fleet.share(1),
                           stopped_at - 2, end)


async def rolling_update(fleet: Fleet, finish: Finish) -> Outcome:
    """What a StatefulSet's rolling update does to each pod in turn: SIGTERM, the exit, the
    replacement (REPLACE_S), the new pod's first sync."""
    procs = fleet.procs
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
    await finish(procs)
    return await _graceful(fleet, "rolling update of the 4 pods", fleet.ids, started, end)


async def two_pods_one_ordinal(fleet: Fleet, finish: Finish) -> Outcome:
    """The node of fo-1 comes back while its replacement runs: two processes, one ordinal."""
    twin = PollerProcess(fleet.procs[1].env | {"PORT": str(free_port())})
    fleet.procs.append(twin)  # closed with the fleet
    await twin.start()
    await twin.synced()
    started = time.time()
    await asyncio.sleep(4)
    end = time.time()
    await finish(fleet.procs)
    return await _graceful(fleet, "two pods with ordinal 1 for 4s", fleet.ids, started, end)


async def kill(fleet: Fleet, finish: Finish) -> Outcome:
    """kill -9 of replica 1: an OOM kill, a lost node."""
    procs = fleet.procs
    killed_at, marks = time.time(), fleet.marks()
    assert procs[1].proc is not None
    procs[1].proc.send_signal(signal.SIGKILL)
    await procs[1].proc.wait()
    taken_at = await fleet.others_see("0,2,3", marks) if fleet.takeover else None
    await asyncio.sleep(max(0.0, killed_at + OUTAGE_S + 3 - time.time()))
    end = time.time()
    await finish([procs[0], procs[2], procs[3]])
    return await _lost(fleet, "kill -9 of one pod", fleet.share(1), killed_at, taken_at, end)


async def freeze(fleet: Fleet, finish: Finish) -> Outcome:
    """SIGSTOP of replica 1 for OUTAGE_S (a stuck node: alive, silent), then SIGCONT."""
    procs = fleet.procs
    assert procs[1].proc is not None
    frozen_at, marks = time.time(), fleet.marks()
    procs[1].proc.send_signal(signal.SIGSTOP)
    taken_at = await fleet.others_see("0,2,3", marks) if fleet.takeover else None
    await asyncio.sleep(max(0.0, frozen_at + OUTAGE_S - time.time()))
    marks = fleet.marks()
    procs[1].proc.send_signal(signal.SIGCONT)
    if fleet.takeover:
        await fleet.others_see("0,1,2,3", marks)  # it is back: its share is given back
    await asyncio.sleep(2)
    end = time.time()
    await finish(procs)
    return await _lost(fleet, f"SIGSTOP of one pod, SIGCONT {OUTAGE_S}s later",
                       fleet.share(1), frozen_at, taken_at, end)


async def cut_from_the_database(fleet: Fleet, finish: Finish, dsn: str) -> Outcome:
    """Replica 1 again, through a proxy that cuts it off for OUTAGE_S like a network
    partition (direct transport only)."""
    procs = fleet.procs
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
        cut_at, marks = time.time(), fleet.marks()
        proxy.cut()  # it pings on and buffers; its heartbeat stops
        taken_at = await fleet.others_see("0,2,3", marks) if fleet.takeover else None
        await asyncio.sleep(max(0.0, cut_at + OUTAGE_S - time.time()))
        marks = fleet.marks()
        proxy.heal()
        if fleet.takeover:
            await fleet.others_see("0,1,2,3", marks)  # back: it writes what it buffered
        else:
            await procs[1].logged(" synced: ", since=marks[1])
        await asyncio.sleep(2)
        end = time.time()
        await finish(procs)
    finally:
        await proxy.stop()
    return await _lost(fleet, f"one pod cut from the database for {OUTAGE_S}s",
                       fleet.share(1), cut_at, taken_at, end)


async def ending_jobs_completed_once(conn: asyncpg.Connection) -> None:
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


async def no_duplicate_rows(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval(
        "select count(*) from (select 1 from samples group by job_id, sequence_number "
        "having count(*) > 1) d") == 0
