"""In-memory stand-ins for unit tests of the recorder's buffering logic.

The same behaviour runs against the real Postgres in the end-to-end tests; these exist to
make failures happen on demand and count calls exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from poller.models import RecordResult, Sample
from poller.progress import Progress
from poller.store import StoreUnavailable


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
        self.progress = Progress()  # notified on every call

    async def record_batch(self, samples: Sequence[Sample],
                           complete: Sequence[UUID]) -> RecordResult:
        self.progress.notify()
        if self.down:
            raise StoreUnavailable("ConnectionRefusedError: database is down")
        self.calls.append((len(samples), list(complete)))
        inserted = 0
        for s in samples:
            if (s.job_id, s.sequence_number) not in self.rows:
                self.rows[(s.job_id, s.sequence_number)] = s
                inserted += 1
        done = tuple(c for c in complete if c not in self.completed)
        self.completed.extend(done)
        return RecordResult(inserted, done)
