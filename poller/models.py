"""Plain data passed between the stages: store → scheduler → pinger → recorder → store."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, NamedTuple
from uuid import UUID

# The largest value samples.rtt_ms and jitter_ms (numeric(10,2)) hold. An "RTT" beyond it is
# not a measurement; storing it would make the database reject the whole batch.
MAX_RTT_MS = 99_999_999.99
# The SpreeDB Latency API's two routes (docs/icmp-and-sidecar.md): GET /latency, POST /ping.
LatencyRoute = Literal["latency", "ping"]


class SampleStatus(StrEnum):
    SUCCESS = "success"
    MISSED = "missed"
    SYSTEM_ERROR = "system_error"


def slot_count(cadence_seconds: int, duration_minutes: int) -> int:
    """Slots k with started_at + k·cadence before the end: seq 0 … slot_count-1. A job with
    no cadence or duration has one slot (its `system_error` sample)."""
    if cadence_seconds < 1 or duration_minutes < 1:
        return 1
    return math.ceil(duration_minutes * 60 / cadence_seconds)


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
        return slot_count(self.cadence_seconds, self.duration_minutes)

    def slot_due(self, k: int) -> float:
        """When slot k falls due, as a Unix timestamp."""
        return self.started_at.timestamp() + k * max(1, self.cadence_seconds)


class Sample(NamedTuple):
    """One ping's outcome. A named tuple, not a dataclass: one is made per ping, and a
    tuple is built in C at half the cost; the stores transpose batches with zip()."""

    job_id: UUID
    sequence_number: int
    status: SampleStatus
    rtt_ms: float | None
    jitter_ms: float | None
    # When the ping was made (not when the batch was written), as Unix seconds: a float
    # per ping where a datetime cost 0.5 us to make and asyncpg 1.3 us more to encode.
    recorded_at: float


@dataclass(frozen=True, slots=True)
class RecordResult:
    inserted: int
    completed: tuple[UUID, ...]
    # alert state transitions the batch made (docs/alerts-and-notices.md, "Exactly once")
    offline: int = 0
    recovery: int = 0
    # refused: their job was completed already (docs/alerts-and-notices.md, "Late samples")
    late: int = 0

    def __add__(self, other: RecordResult) -> RecordResult:
        return RecordResult(self.inserted + other.inserted, self.completed + other.completed,
                            self.offline + other.offline, self.recovery + other.recovery,
                            self.late + other.late)

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> RecordResult:
        # `late` is absent from a database not yet migrated to 0.2.0: none were refused then.
        return cls(int(out["inserted"]), tuple(UUID(x) for x in out["completed"]),
                   int(out.get("offline") or 0), int(out.get("recovery") or 0),
                   int(out.get("late") or 0))


NoticeKind = Literal["offline", "recovery", "completion"]


@dataclass(frozen=True)
class JobSummary:
    """A completed job's samples, as `soundcheck_job_summary` counts them."""

    total: int
    success: int
    missed: int
    system_error: int
    avg_rtt_ms: float | None
    max_rtt_ms: float | None
    p95_rtt_ms: float | None
    outages: int  # runs of 5 or more misses (system errors and gaps do not break one)
    longest_miss_streak: int

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> JobSummary:
        def num(key: str) -> float | None:
            return None if out.get(key) is None else float(out[key])
        return cls(int(out["total"]), int(out["success"]), int(out["missed"]),
                   int(out["system_error"]), num("avg_rtt_ms"), num("max_rtt_ms"),
                   num("p95_rtt_ms"), int(out["outages"]), int(out["longest_miss_streak"]))


@dataclass(frozen=True)
class NoticeJob:
    """What a message says about its job."""

    id: UUID
    account_number: str
    target: str  # the IP, or the MAC for a job without one
    notification_email: str
    requester_name: str
    cadence_seconds: int
    duration_minutes: int
    started_at: datetime
    completed_at: datetime | None

    @property
    def slot_count(self) -> int:
        return slot_count(self.cadence_seconds, self.duration_minutes)

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> NoticeJob:
        return cls(UUID(j["id"]), str(j["account_number"]),
                   str(j.get("target_ip") or j.get("target_mac") or "?"),
                   str(j["notification_email"]), str(j["requester_name"]),
                   int(j["cadence_seconds"]), int(j["duration_minutes"]),
                   datetime.fromisoformat(j["started_at"]),
                   datetime.fromisoformat(j["completed_at"]) if j.get("completed_at") else None)


@dataclass(frozen=True)
class Notice:
    """An alert or a completion notice claimed from the outbox for delivery."""

    id: int
    kind: NoticeKind
    attempts: int  # including this one
    job: NoticeJob
    done_channels: frozenset[str] = field(default_factory=frozenset)
    triggered_at: datetime | None = None  # alerts: the sample that made the transition
    summary: JobSummary | None = None  # completions

    @classmethod
    def from_json(cls, n: dict[str, Any]) -> Notice:
        return cls(int(n["id"]), n["kind"], int(n["attempts"]), NoticeJob.from_json(n["job"]),
                   frozenset(n.get("done_channels") or ()),
                   datetime.fromisoformat(n["triggered_at"]) if n.get("triggered_at") else None,
                   JobSummary.from_json(n["summary"]) if n.get("summary") else None)


@dataclass(frozen=True)
class Claim:
    notices: list[Notice]
    pending: int  # notices waiting in the outbox, these included

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> Claim:
        return cls([Notice.from_json(n) for n in out.get("notices") or []],
                   int(out.get("pending") or 0))
