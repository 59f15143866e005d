"""Plain data passed between the stages: store → scheduler → pinger → recorder → store."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from uuid import UUID


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
    def ends_at(self) -> datetime:
        return self.started_at + timedelta(minutes=self.duration_minutes)

    @property
    def slot_count(self) -> int:
        """Slots k with started_at + k·cadence before the end: seq 0 … slot_count-1."""
        return math.ceil(self.duration_minutes * 60 / self.cadence_seconds)

    def slot_due(self, k: int) -> float:
        """When slot k falls due, as a Unix timestamp."""
        return self.started_at.timestamp() + k * self.cadence_seconds


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
