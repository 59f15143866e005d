"""Plain data passed between the stages: store → scheduler → pinger → recorder → store."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from uuid import UUID

# The largest value samples.rtt_ms and jitter_ms (numeric(10,2)) hold. An "RTT" beyond it is
# not a measurement; storing it would make the database reject the whole batch.
MAX_RTT_MS = 99_999_999.99


class SampleStatus(StrEnum):
    SUCCESS = "success"
    MISSED = "missed"
    SYSTEM_ERROR = "system_error"


@dataclass(frozen=True, slots=True)
class Job:
    """A running real_polling job as the sync function returns it."""

    id: UUID
    target_ip: str | None
    cadence_seconds: int
    duration_minutes: int
    started_at: datetime
    last_ping_at: datetime | None = None

    @property
    def schedulable(self) -> bool:
        """A cadence and a duration of at least 1: otherwise there are no slots to ping.
        Such a job gets one `system_error` sample (slot 0) and is completed at its end."""
        return self.cadence_seconds >= 1 and self.duration_minutes >= 1

    @property
    def ends_at(self) -> datetime:
        return self.started_at + timedelta(minutes=max(0, self.duration_minutes))

    @property
    def slot_count(self) -> int:
        """Slots k with started_at + k·cadence before the end: seq 0 … slot_count-1."""
        if not self.schedulable:
            return 1
        return math.ceil(self.duration_minutes * 60 / self.cadence_seconds)

    def slot_due(self, k: int) -> float:
        """When slot k falls due, as a Unix timestamp."""
        return self.started_at.timestamp() + k * max(1, self.cadence_seconds)


@dataclass(frozen=True, slots=True)
class Sample:
    job_id: UUID
    sequence_number: int
    status: SampleStatus
    rtt_ms: float | None
    jitter_ms: float | None
    recorded_at: datetime  # when the ping was made, not when the batch was written


@dataclass(frozen=True, slots=True)
class RecordResult:
    inserted: int
    completed: tuple[UUID, ...]
