"""Scheduler: slot alignment, resume rules, no slot twice, expiry."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from uuid import uuid4

from poller.models import Job
from poller.scheduler import JobState, Scheduler, first_slot

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def job(cadence: int = 10, minutes: int = 5, started: datetime = T0,
        last_ping: datetime | None = None, ip: str | None = "127.0.0.1") -> Job:
    return Job(uuid4(), ip, cadence, minutes, started, last_ping)


def at(seconds: float) -> float:
    return T0.timestamp() + seconds


def test_slot_arithmetic() -> None:
    j = job(cadence=7, minutes=1)
    assert j.slot_count == 9  # 0, 7, …, 56 start before 60
    assert j.slot_due(3) == at(21)
    assert job(cadence=10, minutes=1).slot_count == 6  # 50 is the last; 60 is the end


def test_first_slot_of_a_job_not_started_yet_is_zero() -> None:
    assert first_slot(job(), at(-30)) == 0


def test_resume_at_the_next_future_slot() -> None:
    pinged = job(last_ping=T0 + timedelta(seconds=40))
    assert first_slot(pinged, at(41)) == 5
    assert first_slot(pinged, at(50)) == 5  # due exactly now counts as future
    assert first_slot(pinged, at(50.001)) == 6


def test_a_never_pinged_job_gets_slot_zero_late() -> None:
    assert first_slot(job(), at(3)) == 0
    assert first_slot(job(), at(13)) == 2  # but never more than one cadence back …
    assert first_slot(job(last_ping=T0), at(3)) == 1  # … and never when already pinged


def _sched(clock_s: float) -> tuple[Scheduler, list[tuple[JobState, int, float]],
                                    list[JobState]]:
    slots: list[tuple[JobState, int, float]] = []
    expired: list[JobState] = []
    s = Scheduler(lambda st, k, due: slots.append((st, k, due)), expired.append,
                  clock=lambda: at(clock_s))
    return s, slots, expired


async def test_update_adds_keeps_and_drops() -> None:
    s, _, _ = _sched(25)
    a, b = job(last_ping=T0), job(last_ping=T0)
    await s.update([a, b])
    assert s.jobs[a.id].next_slot == 3
    s.jobs[a.id].next_slot = 4  # as if slot 3 went out
    await s.update([a])  # b cancelled or moved away
    assert set(s.jobs) == {a.id} and s.jobs[a.id].next_slot == 4


async def test_a_job_that_leaves_and_returns_never_repeats_a_slot() -> None:
    s, _, _ = _sched(25)
    a = job(last_ping=T0)
    await s.update([a])
    s.jobs[a.id].next_slot = 6  # slots up to 5 already dispatched
    await s.update([])
    await s.update([a])
    assert s.jobs[a.id].next_slot == 6


async def _run_until(s: Scheduler, done: asyncio.Event) -> None:
    task = asyncio.create_task(s.run())
    try:
        async with asyncio.timeout(5):
            await done.wait()
    finally:
        s.stop()
        await task


async def test_a_job_that_cannot_be_scheduled_gets_one_slot_and_its_end() -> None:
    # What a user expects of cadence 0 or duration 0: a system_error sample that says why,
    # and the job completed at its end (at once for duration 0), not running for ever.
    calls: list[tuple[str, object, int]] = []
    done = asyncio.Event()

    def note(kind: str, st: JobState, k: int = -1) -> None:
        calls.append((kind, st.id, k))
        if len(calls) == 3:
            done.set()

    s = Scheduler(lambda st, k, due: note("slot", st, k), lambda st: note("end", st),
                  clock=lambda: at(5))
    no_cadence, no_duration = job(cadence=0), job(minutes=0)
    await s.update([no_cadence, no_duration])
    for j in (no_cadence, no_duration):
        assert s.jobs[j.id].ip is None and "at least 1" in (s.jobs[j.id].problem or "")
    await _run_until(s, done)
    assert sorted(calls, key=str) == sorted([
        ("slot", no_cadence.id, 0), ("slot", no_duration.id, 0), ("end", no_duration.id, -1),
    ], key=str)  # no_cadence ends at T0 + 5 min, later


async def test_after_a_stall_only_the_newest_overdue_slot_is_pinged() -> None:
    now = [at(5)]
    pinged: list[int] = []
    skipped: list[int] = []
    done = asyncio.Event()

    def on_slot(st: JobState, k: int, due: float) -> None:
        pinged.append(k)
        done.set()

    s = Scheduler(on_slot, lambda st: None,
                  clock=lambda: now[0], on_skipped=lambda st, k, due: skipped.append(k))
    await s.update([job(cadence=10, last_ping=T0)])  # slot 1 next, due at +10
    now[0] = at(35)  # a 30 s stall: slots 1, 2 and 3 are all due
    await _run_until(s, done)
    assert skipped == [1, 2] and pinged == [3]


async def test_an_invalid_target_is_kept_with_no_address() -> None:
    s, _, _ = _sched(0)
    bad = job(ip="not-an-ip")
    await s.update([bad])
    assert s.jobs[bad.id].ip is None  # its slots become system_error samples


async def test_run_dispatches_each_slot_once_on_time() -> None:
    slots: list[tuple[int, float, float]] = []
    expired: list[JobState] = []
    ended = asyncio.Event()
    start = datetime.fromtimestamp(time.time() - 58.6, UTC)  # 1-minute job, ~1.4 s left
    j = Job(uuid4(), "127.0.0.1", 1, 1, start, start)
    def on_expired(st: JobState) -> None:
        expired.append(st)
        ended.set()

    s = Scheduler(lambda st, k, due: slots.append((k, due, time.time())), on_expired)
    await s.update([j])
    task = asyncio.create_task(s.run())
    async with asyncio.timeout(5):
        await ended.wait()
    s.stop()
    await task
    assert [k for k, _, _ in slots] == [59]  # slot 59 (due at 59 s) is the only one left
    assert all(0 <= fired - due < 0.5 for _, due, fired in slots)  # on time, not a slot late
    assert expired[0].id == j.id


async def test_equal_due_times_and_edits_dispatch_each_slot_once() -> None:
    """Forty jobs started at the same instant (their heap entries tie), half of them edited
    to a slower cadence after slot 1: the old entries of the edited half fire nothing, and
    every job gets each slot at most once, at the time its current cadence says."""
    now = [at(5)]
    pinged: list[tuple[object, int, float]] = []
    skipped: list[tuple[object, int]] = []
    want = [0]
    reached = asyncio.Event()

    def on_slot(st: JobState, k: int, due: float) -> None:
        pinged.append((st.id, k, due))
        if len(pinged) == want[0]:
            reached.set()

    s = Scheduler(on_slot, lambda st: None, clock=lambda: now[0],
                  on_skipped=lambda st, k, due: skipped.append((st.id, k)))

    async def run_at(seconds: float, expect: int) -> list[tuple[object, int, float]]:
        now[0], want[0], start = at(seconds), len(pinged) + expect, len(pinged)
        reached.clear()
        await _run_until(s, reached)
        s._stopping = False  # run again at the next step
        return pinged[start:]

    jobs = [job(cadence=10, minutes=10, last_ping=T0) for _ in range(40)]
    await s.update(jobs)
    assert {k for _, k, _ in await run_at(10, 40)} == {1}
    edited = [Job(j.id, j.target_ip, 20, 10, T0, T0) for j in jobs[:20]]
    await s.update(edited + jobs[20:])
    step = await run_at(20, 20)
    assert {i for i, _, _ in step} == {j.id for j in jobs[20:]} and {k for _, k, _ in step} == {2}
    step = await run_at(40, 40)
    assert sorted((k, due) for i, k, due in step if i in {j.id for j in jobs[:20]}) == \
        [(2, at(40))] * 20  # slot 2 of the 20 s cadence
    assert sorted((k, due) for i, k, due in step if i in {j.id for j in jobs[20:]}) == \
        [(4, at(40))] * 20  # the newest overdue slot; slot 3 was passed over
    assert sorted(skipped, key=str) == sorted(((j.id, 3) for j in jobs[20:]), key=str)
    assert len(pinged) == len(set((i, k) for i, k, _ in pinged)) == 100
