"""Recorder: batching, retry with nothing lost, the buffer bound, completions after samples.

Against an in-memory store so failures happen on demand; the same paths run against the
real Postgres (stopped and restarted) in test_poller_e2e.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from poller.metrics import Metrics
from poller.models import Sample, SampleStatus
from poller.recorder import Recorder
from tests.support.fakes import MemoryStore

NOW = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def sample(job: UUID, seq: int) -> Sample:
    return Sample(job, seq, SampleStatus.SUCCESS, 1.0, None, NOW)


def make(store: MemoryStore, *, batch_size: int = 10, flush_interval_s: float = 3600,
         max_buffered: int = 1000, max_backoff_s: float = 0.05) -> tuple[Recorder, Metrics]:
    metrics = Metrics()
    return Recorder(store, metrics, batch_size=batch_size, flush_interval_s=flush_interval_s,
                    max_buffered=max_buffered, max_backoff_s=max_backoff_s), metrics


async def written(store: MemoryStore, n: int) -> None:
    async with asyncio.timeout(5):
        await store.progress.wait_for(lambda: len(store.rows) >= n)


async def test_full_batches_go_out_at_once_one_call_each() -> None:
    store = MemoryStore()
    rec, _ = make(store)
    task = asyncio.create_task(rec.run())
    job = uuid4()
    for k in range(35):
        rec.add(sample(job, k))
    await written(store, 30)
    assert [n for n, _ in store.calls] == [10, 10, 10]
    assert rec.buffered == 5  # a partial batch waits for the interval
    task.cancel()


async def test_partial_batch_goes_out_on_the_interval() -> None:
    store = MemoryStore()
    rec, _ = make(store, flush_interval_s=0.05)
    task = asyncio.create_task(rec.run())
    rec.add(sample(uuid4(), 0))
    await written(store, 1)
    task.cancel()


async def test_outage_keeps_everything_and_retries() -> None:
    store = MemoryStore()
    store.down = True
    rec, metrics = make(store, flush_interval_s=0.01)
    task = asyncio.create_task(rec.run())
    job = uuid4()
    for k in range(57):
        rec.add(sample(job, k))
    async with asyncio.timeout(5):
        await store.progress.wait_for(
            lambda: metrics.value("soundcheck_poller_flush_errors_total") >= 3)
    assert rec.buffered == 57 and rec.last_error
    store.down = False
    await written(store, 57)
    assert sorted(k for _, k in store.rows) == list(range(57))
    assert rec.last_error is None
    task.cancel()


def test_buffer_bound_drops_the_oldest_and_counts() -> None:
    store = MemoryStore()
    rec, metrics = make(store, max_buffered=5, batch_size=100)
    job = uuid4()
    for k in range(8):
        rec.add(sample(job, k))
    assert rec.buffered == 5
    assert metrics.value("soundcheck_poller_samples_dropped_total") == 3


async def test_drops_while_a_write_is_out_do_not_pop_newer_samples() -> None:
    store = MemoryStore()
    release = asyncio.Event()
    store.gate = release  # each write waits for it
    rec, _ = make(store, max_buffered=6, batch_size=4)
    job = uuid4()
    for k in range(4):
        rec.add(sample(job, k))
    write = asyncio.create_task(rec._flush(partial=True))
    async with asyncio.timeout(5):
        await store.progress.wait_for(lambda: store.started == 1)  # batch 0..3 is out
    for k in range(4, 9):  # 9 accepted, bound 6: 0, 1, 2 dropped meanwhile
        rec.add(sample(job, k))
    release.set()
    assert await write  # 0..3, then the full batch 4..7; 8 waits for the next round
    assert rec.buffered == 1
    assert await rec._flush(partial=True)
    assert sorted(k for _, k in store.rows) == list(range(9))
    assert rec.buffered == 0


async def test_completion_waits_for_the_jobs_samples() -> None:
    store = MemoryStore()
    rec, _ = make(store, batch_size=3)
    job = uuid4()
    for k in range(5):
        rec.add(sample(job, k))
    rec.request_completion(job)
    assert await rec._write_one()  # samples 0..2: too early to complete
    assert store.calls[-1] == (3, [])
    assert await rec._write_one()  # samples 3..4: the job's last, completion rides along
    assert store.calls[-1] == (2, [job])
    assert rec.pending_completions == 0
    assert await rec._write_one() is None  # nothing left


async def test_drain_writes_every_batch_not_just_one() -> None:
    store = MemoryStore()
    store.down = True
    rec, _ = make(store, batch_size=10)
    job = uuid4()
    for k in range(95):
        rec.add(sample(job, k))
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, setattr, store, "down", False)
    assert await rec.drain(loop.time() + 5)
    assert len(store.rows) == 95 and len(store.calls) == 10


async def test_drain_gives_up_at_the_deadline_and_says_so() -> None:
    store = MemoryStore()
    store.down = True
    rec, _ = make(store)
    rec.add(sample(uuid4(), 0))
    assert not await rec.drain(asyncio.get_running_loop().time() + 0.2)
    assert rec.buffered == 1


@pytest.mark.parametrize("n", [1, 10, 11])
async def test_drain_with_nothing_failing(n: int) -> None:
    store = MemoryStore()
    rec, _ = make(store)
    job = uuid4()
    for k in range(n):
        rec.add(sample(job, k))
    rec.request_completion(job)
    assert await rec.drain(asyncio.get_running_loop().time() + 5)
    assert len(store.rows) == n and store.completed == [job]


async def test_rows_the_database_rejects_are_set_aside_and_the_rest_written() -> None:
    store = MemoryStore()
    store.bad_rtt = 1e9  # as a numeric(10,2) overflow would be refused, SQLSTATE 22003
    rec, metrics = make(store, batch_size=100, flush_interval_s=0.01)
    task = asyncio.create_task(rec.run())
    job = uuid4()
    for k in range(100):
        rec.add(Sample(job, k, SampleStatus.SUCCESS, 1e9 if k in (7, 70) else 1.0, None, NOW))
    rec.request_completion(job)
    await written(store, 98)
    async with asyncio.timeout(5):
        await store.progress.wait_for(lambda: store.completed == [job])
    task.cancel()
    assert set(store.rows) == {(job, k) for k in range(100) if k not in (7, 70)}
    assert metrics.value("soundcheck_poller_samples_rejected_total") == 2
    assert metrics.value("soundcheck_poller_flush_errors_total") == 0  # not an outage
    assert rec.buffered == 0 and rec.last_error is None


async def _overflow_during_a_write(store: MemoryStore) -> tuple[
        Recorder, Metrics, asyncio.Task[None]]:
    """Batch 0-9 is being written (held at the store's gate) when 12 more samples arrive:
    22 > 15, so the 7 oldest (0-6, all in that write) leave the buffer."""
    store.gate = asyncio.Event()
    rec, metrics = make(store, batch_size=10, max_buffered=15, flush_interval_s=3600)
    task = asyncio.create_task(rec.run())
    job = uuid4()
    for k in range(10):
        rec.add(sample(job, k))
    async with asyncio.timeout(5):
        await store.progress.next()  # the write of 0-9 has begun
    for k in range(10, 22):
        rec.add(sample(job, k))
    assert metrics.value("soundcheck_poller_samples_dropped_total") == 0  # not yet known
    store.gate.set()
    return rec, metrics, task


async def test_drops_are_counted_exactly_while_a_batch_is_being_written() -> None:
    store = MemoryStore()
    _, metrics, task = await _overflow_during_a_write(store)
    await written(store, 20)
    task.cancel()
    # 0-9 were written by the write in flight: nothing of them was lost.
    assert {k for _, k in store.rows} >= set(range(10))
    assert metrics.value("soundcheck_poller_samples_dropped_total") == 0


async def test_drops_in_a_failed_write_are_counted_once_it_fails() -> None:
    store = MemoryStore()
    store.down = True
    rec, metrics, task = await _overflow_during_a_write(store)
    async with asyncio.timeout(5):
        await store.progress.wait_for(
            lambda: metrics.value("soundcheck_poller_flush_errors_total") >= 1)
    task.cancel()
    assert metrics.value("soundcheck_poller_samples_dropped_total") == 7
    assert rec.buffered == 15


async def test_an_unexpected_store_exception_never_kills_the_loop() -> None:
    store = MemoryStore()
    store.crash = RuntimeError("cannot switch to state 15; another operation is in progress")
    rec, _ = make(store, flush_interval_s=0.01)
    task = asyncio.create_task(rec.run())
    rec.add(sample(uuid4(), 0))
    await written(store, 1)
    assert not task.done()
    task.cancel()
