"""When each job's next ping is due (docs/architecture.md, "How it works"), as one timer wheel.

Slot k of a job falls due at `started_at + k·cadence_seconds` for every slot before the
job's end; `sequence_number = k`. Phases come from each job's own start time, never from
a global tick, so load spreads the way jobs were started. The scheduler only decides
*when*: it hands (job, slot, due) to `on_slot`, and a job whose last slot is past to
`on_expired`.

Rules that keep samples exact:
- a slot is dispatched at most once per process, even if its job leaves and comes back;
- a job first seen after its start resumes at the next future slot (past slots are never
  invented), except that a job never pinged at all (`last_ping_at` null) gets slot 0 late
  rather than lose its first sample to sync delay;
- after a stall (a GC pause, a frozen process) a job's overdue slots are not all pinged at
  once: each slot whose successor is already due too goes to `on_skipped` (counted, not
  pinged), and only the newest is pinged: at most one catch-up ping per job;
- a job that cannot be scheduled (cadence or duration below 1, see `Job.schedulable`) gets
  slot 0 only, and its end.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from uuid import UUID

from .models import Job
from .targets import TargetPolicy

_MAX_IDLE_S = 1.0  # wake at least this often, so /health sees the loop turning
# Dispatch rounds are at least this far apart. Due times of many jobs are microseconds
# apart: waking for each one costs an event-loop turn (a timer, an epoll_wait) per ping,
# a sixth of the process's CPU at 16,000 pings/s. A ping starts at most this much late
# for it (never early: a slot is not pinged before it is due).
_TICK_S = 0.002
_YIELD_EVERY = 500  # dispatches between yields to the event loop in a burst
_UPDATE_CHUNK = 200  # jobs per step of a sync's update (a few ms: a ping waits no longer)
_SCAN_CHUNK = 20_000  # owned or departed jobs checked per step at the end of a full read


class JobState:
    """One owned job as the scheduler keeps it: what its slots need and nothing more.

    At a million jobs per process memory is per-job bytes: plain slots (no `Job`, no
    datetimes, no dict per object), the start as a float, and the address to ping shared
    with the target text when that is already canonical."""

    __slots__ = ("cadence", "complete_when_idle", "duration", "entry", "expired", "id",
                 "in_flight", "ip", "last_rtt", "next_slot", "problem", "slot_count", "start")

    def __init__(self, job: Job, ip: str | None, problem: str | None, next_slot: int) -> None:
        self.id: UUID = job.id
        self.ip, self.problem = ip, problem  # the address to ping, or None and why not
        self.next_slot = next_slot
        self.entry: list[JobState] | None = None  # the wheel bucket it waits in
        self.last_rtt: float | None = None
        self.in_flight = 0
        self.expired = False  # the end entry fired: no slot left
        self.complete_when_idle = False
        self.set_job(job)

    def set_job(self, job: Job) -> None:
        self.start = job.started_at.timestamp()
        self.cadence = _shared(job.cadence_seconds)
        self.duration = _shared(job.duration_minutes)
        self.slot_count = _shared(job.slot_count)

    def same_slots(self, job: Job) -> bool:
        return (self.cadence == job.cadence_seconds and self.duration == job.duration_minutes
                and self.start == job.started_at.timestamp())

    def slot_due(self, k: int) -> float:
        # Past slot 0 only for schedulable jobs, whose cadence is at least 1 (Job.slot_due).
        return self.start + k * self.cadence

    @property
    def ends_at(self) -> float:
        return self.start + max(0, self.duration) * 60

_SHARED: dict[int, int] = {}


def _shared(value: int) -> int:
    """One int object per distinct value (cadences, durations, slot counts repeat across
    jobs; each int above 256 is 28 bytes of its own); bounded, as values come from users."""
    if len(_SHARED) < 4096:
        return _SHARED.setdefault(value, value)
    return _SHARED.get(value, value)


def first_slot(job: Job, now: float) -> int:
    """The first slot to ping for a job seen now for the first time."""
    if not job.schedulable:
        return 0 if job.last_ping_at is None else 1
    start = job.started_at.timestamp()
    k = max(0, math.ceil((now - start) / job.cadence_seconds))
    if k == 1 and job.last_ping_at is None:
        return 0  # never pinged: its first sample is late rather than missing
    return k


# The wheel: a bucket (a list of states) per tick of _TICK_S that has something due, keyed
# by the tick's number; the tick numbers with a bucket in a heap of their own (a few
# thousand ticks, not a million entries). A job due at t waits in the bucket of the first
# tick at or after t, so it is never pinged early. It stands there only while
# `state.entry is bucket`: being put in another bucket, or leaving, voids the old place.
# What it fires is the job's `next_slot`, or its end once no slot is left.
#
# Per job this is one list slot, where a heap of (due, state) entries held a tuple and a
# float (57 bytes more per job, measured) and cost O(log n) comparisons per ping. The
# wheel itself is a list per tick with something due: at most cadence / _TICK_S of them.


class Scheduler:
    def __init__(
        self,
        on_slot: Callable[[JobState, int, float], None],
        on_expired: Callable[[JobState], None],
        clock: Callable[[], float] = time.time,
        *,
        on_skipped: Callable[[JobState, int, float], None] | None = None,
        policy: TargetPolicy | None = None,
    ) -> None:
        self._on_slot = on_slot
        self._on_expired = on_expired
        self._on_skipped = on_skipped or on_slot
        self._policy = policy or TargetPolicy()
        self._clock = clock
        self._jobs: dict[UUID, JobState] = {}
        # Jobs that left the owned set, until they end: one that comes back (topology
        # flicker, a sync hiccup) resumes after the last slot dispatched, never repeats one.
        self._departed: dict[UUID, JobState] = {}
        self._wheel: dict[int, list[JobState]] = {}
        self._ticks: list[int] = []  # heap of the wheel's tick numbers
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = False
        self.heartbeat = time.monotonic()

    @property
    def jobs(self) -> dict[UUID, JobState]:
        return self._jobs

    async def update(self, jobs: Iterable[Job]) -> None:
        """Replace the owned set with these jobs (a full read in one piece)."""
        await self.replace(_one(list(jobs)))

    async def replace(self, pages: AsyncIterator[list[Job]]) -> None:
        """Replace the owned set with the pages of a full read, taking each up as it
        arrives; jobs no page held are dropped at the end.

        Yields to the event loop every few thousand jobs, so a large read never holds up
        pings that fall due meanwhile (the wheel stays valid between chunks).
        """
        seen: set[UUID] = set()
        async for page in pages:
            seen.update(job.id for job in page)
            await self._upsert_all(page)
        owned = list(self._jobs)
        for i in range(0, len(owned), _SCAN_CHUNK):
            for job_id in owned[i:i + _SCAN_CHUNK]:
                if job_id not in seen and job_id in self._jobs:
                    self._remove(job_id)
            await asyncio.sleep(0)
        await self._forget_departed()

    async def apply(self, changed: Iterable[Job], gone: Iterable[UUID]) -> None:
        """Apply what changed since the last sync: jobs new or edited (their current rows)
        and jobs to stop pinging (cancelled, completed, deleted, no longer real-polling)."""
        for job_id in gone:
            if job_id in self._jobs:
                self._remove(job_id)
        await self._upsert_all(changed)
        await self._forget_departed()

    def _remove(self, job_id: UUID) -> None:
        state = self._jobs.pop(job_id)
        state.entry = None
        self._departed[job_id] = state

    async def _forget_departed(self) -> None:
        """Drop the record of departed jobs that have ended (they cannot come back)."""
        now = self._clock()
        departed = list(self._departed.items())
        for i in range(0, len(departed), _SCAN_CHUNK):
            for job_id, state in departed[i:i + _SCAN_CHUNK]:
                if state.ends_at < now:
                    del self._departed[job_id]
            await asyncio.sleep(0)

    async def _upsert_all(self, jobs: Iterable[Job]) -> None:
        now = self._clock()
        for i, job in enumerate(jobs):
            if i and i % _UPDATE_CHUNK == 0:
                await asyncio.sleep(0)
                now = self._clock()
            state = self._jobs.get(job.id)
            if state is not None and state.same_slots(job):
                state.ip, state.problem = self._target(job)  # the target may have changed
                if state.expired and state.in_flight == 0 and not state.complete_when_idle:
                    # Still running after we asked to complete it (write failed, clock skew):
                    # ask again.
                    self._push(now, state)
                continue
            self._add(job, now, state)
        self._wake()

    def _add(self, job: Job, now: float, state: JobState | None) -> None:
        k = first_slot(job, now)
        departed = self._departed.pop(job.id, None)
        if departed is not None and departed.same_slots(job):
            k = max(k, departed.next_slot)
        if state is None:
            state = JobState(job, *self._target(job), k)
            self._jobs[job.id] = state
        else:
            # Its slots changed (an edited job): update the same object, which pings in
            # flight hold; the entry pushed below voids the old one.
            if state.start == job.started_at.timestamp():
                k = max(k, state.next_slot)
            state.set_job(job)
            state.next_slot = k
            state.ip, state.problem = self._target(job)
            state.expired = False
        self._push_next(state)

    def _target(self, job: Job) -> tuple[str | None, str | None]:
        if not job.schedulable:
            return None, (f"cannot schedule: cadence_seconds={job.cadence_seconds} and "
                          f"duration_minutes={job.duration_minutes} must both be at least 1")
        return self._policy.check(job.target_ip)

    def _push(self, due: float, state: JobState) -> None:
        tick = math.ceil(due / _TICK_S)
        bucket = self._wheel.get(tick)
        if bucket is None:
            self._wheel[tick] = bucket = []
            heapq.heappush(self._ticks, tick)
        bucket.append(state)
        state.entry = bucket

    def _push_next(self, state: JobState) -> None:
        if state.next_slot < state.slot_count:
            self._push(state.slot_due(state.next_slot), state)
        else:
            self._push(state.ends_at, state)

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    async def run(self) -> None:
        dispatched = 0
        while not self._stopping:
            self.heartbeat = time.monotonic()
            now = self._clock()
            # Ticks whose time has come; buckets made meanwhile for a tick already past (a
            # catch-up, a job added late) are among them. (Tick numbers compared, not
            # times: ceil(due / tick) <= floor(now / tick) never fires a job before due.)
            while self._ticks and self._ticks[0] <= math.floor(now / _TICK_S) \
                    and not self._stopping:
                bucket = self._wheel.pop(heapq.heappop(self._ticks), None)
                for state in bucket or ():
                    if state.entry is not bucket:
                        continue  # the job left, or its slots changed
                    state.entry = None
                    self._fire(state, now)
                    dispatched += 1
                    if dispatched % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # states this voids meanwhile are skipped
                        now = self._clock()
            delay = _MAX_IDLE_S
            if self._ticks:
                delay = min(delay, max(_TICK_S, self._ticks[0] * _TICK_S - self._clock()))
            await self._sleep(delay)

    def _fire(self, state: JobState, now: float) -> None:
        slot = state.next_slot
        if slot >= state.slot_count:
            state.expired = True
            self._on_expired(state)
            return
        state.next_slot += 1
        due = state.slot_due(slot)
        if state.next_slot < state.slot_count and state.slot_due(state.next_slot) <= now:
            self._on_skipped(state, slot, due)  # behind: ping only the newest
        else:
            self._on_slot(state, slot, due)
        self._push_next(state)

    async def _sleep(self, delay: float) -> None:
        """Sleep up to `delay`, or until update()/stop() wakes us: one timer and one future,
        cheaper than asyncio.timeout around an Event at a thousand wake-ups a second."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(delay, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)


async def _one(jobs: list[Job]) -> AsyncIterator[list[Job]]:
    yield jobs


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
