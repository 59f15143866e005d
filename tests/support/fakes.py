"""In-memory stand-ins for unit tests of the recorder's buffering logic.

The same behaviour runs against the real Postgres in the end-to-end tests; these exist to
make failures happen on demand and count calls exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import UUID

from poller.models import RecordResult, Sample
from poller.progress import Progress
from poller.store import StoreDataError, StoreUnavailable


class NullStore:
    """For tests that must never write."""

    async def record_batch(self, samples: Sequence[Sample],
                           complete: Sequence[UUID]) -> RecordResult:
        raise AssertionError("NullStore.record_batch called")


class MemoryStore:
    """Keeps what it is given, keyed like the real unique index; fails while `down`."""

    def __init__(self) -> None:
        self.rows: dict[tuple[UUID, int], Sample] = {}
        self.calls: list[tuple[int, list[UUID]]] = []  # (batch length, completions) per call
        self.completed: list[UUID] = []
        self.down = False
        self.bad_rtt: float | None = None  # a batch holding a sample with it is rejected
        self.crash: BaseException | None = None  # raised by the next call, once
        self.gate: asyncio.Event | None = None  # while set to an unset event, calls wait
        self.progress = Progress()  # notified on every call
        self.started = 0  # calls begun (a call waiting at the gate included)

    async def record_batch(self, samples: Sequence[Sample],
                           complete: Sequence[UUID]) -> RecordResult:
        self.started += 1
        self.progress.notify()
        if self.gate is not None:
            await self.gate.wait()
        if self.crash is not None:
            crash, self.crash = self.crash, None
            raise crash
        if self.down:
            raise StoreUnavailable("ConnectionRefusedError: database is down")
        if self.bad_rtt is not None and any(s.rtt_ms == self.bad_rtt for s in samples):
            raise StoreDataError("NumericValueOutOfRangeError (SQLSTATE 22003)")
        self.calls.append((len(samples), list(complete)))
        inserted = 0
        for s in samples:
            if (s.job_id, s.sequence_number) not in self.rows:
                self.rows[(s.job_id, s.sequence_number)] = s
                inserted += 1
        done = tuple(c for c in complete if c not in self.completed)
        self.completed.extend(done)
        return RecordResult(inserted, done)
