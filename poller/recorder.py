"""Buffers samples and writes them in batches, one SQL-API call per batch.

A batch goes out as soon as BATCH_SIZE samples wait, and whatever waits goes out every
BATCH_FLUSH_INTERVAL_MS; full batches are written back to back, so the write rate follows
the ping rate. A failed write keeps the batch at the head of the buffer and is retried
with capped exponential backoff; past MAX_BUFFERED_SAMPLES the oldest samples are dropped,
counted and logged. Job completions ride with the batch that holds the job's last sample
(or a later one), so rollups always see every sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from itertools import islice
from uuid import UUID

from .metrics import Metrics
from .models import Sample
from .progress import Progress
from .store import Store, StoreError, StoreMisconfigured

log = logging.getLogger("poller.recorder")

_FIRST_BACKOFF_S = 0.2
_DROP_LOG_EVERY_S = 10.0


class Recorder:
    def __init__(
        self,
        store: Store,
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
            self._head += 1
            self._note_drop()
        if len(self._buffer) >= self._batch_size:
            self._full.set()

    def request_completion(self, job_id: UUID) -> None:
        """Complete the job once every sample accepted so far has been written."""
        self._completions[job_id] = self._head + len(self._buffer)

    def _note_drop(self) -> None:
        self._metrics.dropped.inc()
        self._dropped_since_log += 1
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
        """One SQL-API call for the head of the buffer: True sent, False failed, None idle."""
        batch = list(islice(self._buffer, self._batch_size))
        end = self._head + len(batch)
        ready = [job for job, pos in self._completions.items() if pos <= end]
        if not batch and not ready:
            return None
        try:
            result = await self._store.record_batch(batch, ready)
        except StoreError as exc:
            self._metrics.flush_errors.inc()
            self.last_error = str(exc)
            level = logging.ERROR if isinstance(exc, StoreMisconfigured) else logging.WARNING
            log.log(level, "writing %d samples failed, kept for retry: %s", len(batch), exc)
            self.progress.notify()
            return False
        # add() may have dropped some of this batch from the head while we awaited (buffer
        # full); pop only what is still there.
        for _ in range(end - self._head):
            self._buffer.popleft()
        self._head = max(self._head, end)
        for job in ready:
            if self._completions.get(job, end + 1) <= end:
                del self._completions[job]
        self._metrics.flushes.inc()
        self._metrics.written.inc(result.inserted)
        self._metrics.completed.inc(len(result.completed))
        self.last_error = None
        self.progress.notify()
        return True

    async def drain(self, deadline: float) -> bool:
        """Write everything buffered, retrying until the monotonic `deadline`."""
        backoff = _FIRST_BACKOFF_S
        while self._buffer or self._completions:
            if await self._flush(partial=True):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, self._max_backoff)
        if self._buffer:
            log.error("shutdown: %d samples could not be written and are lost", len(self._buffer))
            return False
        return True
