"""Buffers samples and writes them in batches, one SQL-API call per batch.

A batch goes out as soon as BATCH_SIZE samples wait, and whatever waits goes out every
BATCH_FLUSH_INTERVAL_MS; full batches are written back to back, so the write rate follows
the ping rate. Job completions ride with the batch that holds the job's last sample (or a
later one), so rollups always see every sample.

What a failed write means decides what happens to its samples:
- an outage (`StoreUnavailable`) or a setup problem (`StoreMisconfigured`): the batch stays
  at the head of the buffer and is retried with capped exponential backoff; past
  MAX_BUFFERED_SAMPLES the oldest samples are dropped, counted and logged;
- data the database rejects (`StoreDataError`, SQLSTATE classes 22/23): retrying cannot
  help, so the batch is bisected until the offending samples stand alone; they are set
  aside (counted in `samples_rejected_total`, logged with their values) and the rest is
  written. One bad value never holds up the samples behind it.
Any other exception from a store is treated as an outage: the loop never dies of one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice
from uuid import UUID

from .metrics import Metrics
from .models import RecordResult, Sample
from .progress import Progress
from .store import (
    RecorderStore,
    StoreDataError,
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
    raise_if_cancelling,
)

log = logging.getLogger("poller.recorder")

_FIRST_BACKOFF_S = 0.2
_DROP_LOG_EVERY_S = 10.0


class Recorder:
    def __init__(
        self,
        store: RecorderStore,
        metrics: Metrics,
        *,
        batch_size: int,
        flush_interval_s: float,
        max_buffered: int,
        max_backoff_s: float,
        progress: Progress | None = None,
    ) -> None:
        self.progress = progress or Progress()
        self._store = store
        self._metrics = metrics
        self._batch_size = batch_size
        self._flush_interval = flush_interval_s
        self._max_buffered = max_buffered
        self._max_backoff = max_backoff_s
        self._buffer: deque[Sample] = deque()
        # Positions count samples ever accepted; the head of the buffer sits at _head.
        self._head = 0
        # job id → position after which its completion may be sent.
        self._completions: dict[UUID, int] = {}
        # While a batch is being written its samples stay at the head of the buffer. A drop
        # that hits them is counted only if that write then fails (else they were written).
        self._writing_end = 0  # position just past the batch being written; 0: none
        self._drops_in_write = 0
        # Samples already set aside (by identity) while isolating bad data: a retry after an
        # outage in the middle of isolating them never counts them twice.
        self._rejected: set[int] = set()
        self._full = asyncio.Event()
        metrics.buffered.set_function(lambda: len(self._buffer))
        self._dropped_since_log = 0
        self._last_drop_log = 0.0
        self.last_error: str | None = None
        self.heartbeat = time.monotonic()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def pending_completions(self) -> int:
        return len(self._completions)

    def add(self, sample: Sample) -> None:
        self._buffer.append(sample)
        if len(self._buffer) > self._max_buffered:
            self._buffer.popleft()
            if self._head < self._writing_end:
                self._drops_in_write += 1
            else:
                self._note_drops(1)
            self._head += 1
        if len(self._buffer) >= self._batch_size:
            self._full.set()

    def request_completion(self, job_id: UUID) -> None:
        """Complete the job once every sample accepted so far has been written."""
        self._completions[job_id] = self._head + len(self._buffer)

    def _note_drops(self, n: int) -> None:
        self._metrics.dropped.inc(n)
        self._dropped_since_log += n
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_EVERY_S:
            log.error(
                "sample buffer full (%d): dropped the %d oldest samples since the last report",
                self._max_buffered, self._dropped_since_log,
            )
            self._dropped_since_log = 0
            self._last_drop_log = now

    async def run(self) -> None:
        """Write batches until cancelled."""
        backoff = 0.0
        next_interval = time.monotonic() + self._flush_interval
        while True:
            self.heartbeat = time.monotonic()
            wait = backoff if backoff else max(0.0, next_interval - time.monotonic())
            if not backoff:
                try:
                    async with asyncio.timeout(wait):
                        await self._full.wait()
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(wait)
            self._full.clear()
            interval_due = time.monotonic() >= next_interval
            if interval_due:
                next_interval = time.monotonic() + self._flush_interval
            ok = await self._flush(partial=interval_due or bool(backoff))
            backoff = 0.0 if ok else min(max(backoff * 2, _FIRST_BACKOFF_S), self._max_backoff)

    async def _flush(self, *, partial: bool) -> bool:
        """Write full batches, and with `partial` everything accepted before this call.

        Samples arriving during the writes wait for the next round unless they fill a
        batch: otherwise a steady trickle would turn into a chain of tiny writes.
        """
        goal = self._head + len(self._buffer) if partial else self._head
        while (
            len(self._buffer) >= self._batch_size
            or self._head < goal
            or (partial and any(pos <= goal for pos in self._completions.values()))
        ):
            sent = await self._write_one()
            if sent is None:
                break
            if not sent:
                return False
        return True

    async def _write_one(self) -> bool | None:
        """One batch from the head of the buffer: True sent, False failed, None idle."""
        batch = list(islice(self._buffer, self._batch_size))
        end = self._head + len(batch)
        ready = [job for job, pos in self._completions.items() if pos <= end]
        if not batch and not ready:
            return None
        self._writing_end, self._drops_in_write = end, 0
        try:
            result = await self._write_isolating(batch, ready)
        except Exception as exc:
            self._note_drops(self._drops_in_write)  # gone from the buffer, never written
            self._metrics.flush_errors.inc()
            self.last_error = str(exc) if isinstance(exc, StoreError) else repr(exc)
            if isinstance(exc, StoreMisconfigured):
                log.error("writing %d samples failed, kept for retry: %s", len(batch), exc)
            elif isinstance(exc, StoreUnavailable):
                log.warning("writing %d samples failed, kept for retry: %s", len(batch), exc)
            else:
                log.exception("writing %d samples failed unexpectedly, kept for retry",
                              len(batch))
            raise_if_cancelling()
            self.progress.notify()
            return False
        finally:
            self._writing_end = 0
        # add() may have dropped some of this batch from the head while we awaited (buffer
        # full); pop only what is still there.
        for _ in range(end - self._head):
            self._buffer.popleft()
        self._head = max(self._head, end)
        for job in ready:
            if self._completions.get(job, end + 1) <= end:
                del self._completions[job]
        self._rejected.clear()
        self._metrics.flushes.inc()
        self._metrics.written.inc(result.inserted)
        self._metrics.completed.inc(len(result.completed))
        if result.late:
            self._metrics.late.inc(result.late)
            log.info("%d samples refused: their jobs were completed already", result.late)
        if result.offline:
            self._metrics.alerts.labels("offline").inc(result.offline)
        if result.recovery:
            self._metrics.alerts.labels("recovery").inc(result.recovery)
        self.last_error = None
        self.progress.notify()
        return True

    async def _write_isolating(self, batch: Sequence[Sample], ready: Sequence[UUID]
                               ) -> RecordResult:
        """Write the batch; on a data error, bisect and set aside the samples that fail alone.

        Completions go with the last part, after every sample before them. An outage in the
        middle raises: the whole batch is retried later, and the parts already written are
        absorbed by the unique key.
        """
        todo = [s for s in batch if id(s) not in self._rejected]
        try:
            return await self._store.record_batch(todo, ready)
        except StoreDataError as exc:
            if len(todo) <= 1:
                if not todo:
                    raise  # the completions alone were refused: not a sample's fault
                self._reject(todo[0], exc)
                return await self._store.record_batch([], ready) if ready else RecordResult(0, ())
            half = len(todo) // 2
            first = await self._write_isolating(todo[:half], ())
            second = await self._write_isolating(todo[half:], ready)
            return first + second

    def _reject(self, sample: Sample, exc: StoreDataError) -> None:
        self._rejected.add(id(sample))
        self._metrics.rejected.inc()
        log.error("sample set aside, the database rejects it: job %s seq %d status %s "
                  "rtt_ms %r jitter_ms %r: %s", sample.job_id, sample.sequence_number,
                  sample.status.value, sample.rtt_ms, sample.jitter_ms, exc)

    async def drain(self, deadline: float) -> bool:
        """Write everything buffered, retrying until the monotonic `deadline`; every write
        is bounded by the time left, so a database that does not answer cannot hold it."""
        backoff = _FIRST_BACKOFF_S
        while self._buffer or self._completions:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    if await self._flush(partial=True):
                        break
            except TimeoutError:
                self._note_drops(self._drops_in_write)
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, self._max_backoff)
        if self._buffer:
            log.error("shutdown: gave up on %d samples that could not be written in time",
                      len(self._buffer))
            return False
        return True
