"""The SQL API behind one small interface, whatever the transport (asyncpg or PostgREST).

Errors are sorted into three kinds so callers can act on them without knowing the
transport: `StoreUnavailable` (outage, timeout, 5xx: retry, keep samples),
`StoreMisconfigured` (bad credentials, SQL API missing or too old, SQLSTATE class 42: tell
the operator what to fix, keep samples) and `StoreDataError` (the database rejected the
data itself, SQLSTATE classes 22 and 23: the same rows would fail again, so the recorder
sets them aside instead of retrying).

Lists of jobs come in pages, each one JSON value: PostgREST cuts every result at
db-max-rows, set-returning RPCs included, but never a single value. A sync brings only
what changed since the last one (`Changes`), or, after a restart, a topology change or
with no cursor, the first page of a full read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from ..models import Claim, Job, RecordResult, Sample
from ..settings import Settings

API_VERSION = 7  # the oldest poller_api_version() this poller works with (incremental sync)
OPERATOR_API_VERSION = 6  # what the operator reads and writes (topology, fleet, outbox)


class StoreError(Exception):
    """A call to the SQL API failed."""


class StoreUnavailable(StoreError):
    """The database could not be reached or did not answer in time; worth retrying."""


class StoreMisconfigured(StoreError):
    """Retrying will not help until someone fixes credentials or applies migrations."""


class StoreDataError(StoreError):
    """The database rejected the values sent (SQLSTATE class 22 or 23): not an outage."""


def error_for_sqlstate(sqlstate: str, text: str) -> StoreError:
    """The kind of error an SQLSTATE means for the caller (docs/architecture.md, "Errors")."""
    if sqlstate.startswith(("22", "23")):
        return StoreDataError(text)
    if sqlstate == "42P10":  # ON CONFLICT found no usable unique index on samples
        return StoreMisconfigured(
            f"{text}; samples has no valid unique index on (job_id, sequence_number): "
            "run `python -m poller migrate`")
    if sqlstate.startswith(("42", "28", "3D")):
        return StoreMisconfigured(text)
    return StoreUnavailable(text)


class Lifecycle(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def api_version(self) -> int: ...


class SyncStore(Lifecycle, Protocol):
    """What the sync stage reads: the owned jobs (changes or pages) and the fleet's state."""

    async def job_changes(self, buckets: Sequence[int], cursor: int | None,
                          limit: int) -> Changes: ...

    async def jobs_in_buckets(self, buckets: Sequence[int], after: UUID | None,
                              limit: int) -> JobsPage: ...

    async def fleet_sync(self, fleet: str, replica_id: int, applied: Applied, leaving: bool,
                         owned_jobs: int, version: str, limit: int, cursor: int | None,
                         buckets: Sequence[int]) -> FleetSync: ...


class RecorderStore(Protocol):
    """What the recorder writes: a batch of samples and the jobs it completes."""

    async def record_batch(
        self, samples: Sequence[Sample], complete_job_ids: Sequence[UUID]
    ) -> RecordResult: ...


class NoticeStore(Protocol):
    """What notice delivery claims and records."""

    async def claim_notices(self, claimer: str, limit: int, lease_s: int) -> Claim: ...

    async def finish_notice(self, notice_id: int, claimer: str, done: Sequence[str],
                            error: str | None, retry_s: float, max_attempts: int
                            ) -> str | None: ...


class OperatorStore(Lifecycle, Protocol):
    """What the operator reads and publishes for a fleet."""

    async def fleet_state(self, fleet: str) -> FleetState: ...

    async def publish_topology(self, fleet: str, counts: Sequence[int]) -> int: ...

    async def set_failover(self, fleet: str, failover_s: int) -> None: ...

    async def outbox_state(self) -> OutboxState: ...


class Store(SyncStore, RecorderStore, NoticeStore, OperatorStore, Protocol):
    """The whole SQL API, as both transports implement it (make_store); each client takes
    only its part above, so a test fake implements only what its client calls."""


@dataclass(frozen=True)
class JobsPage:
    jobs: list[Job]
    next: UUID | None  # the last id of this page when more may follow, else None

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> JobsPage:
        return cls([job_from_json(row) for row in out["jobs"]],
                   UUID(out["next"]) if out.get("next") else None)


@dataclass(frozen=True)
class Changes:
    """What a sync brings for a replica's buckets.

    `full`: the first page of a full read (`jobs`; `next` set when more pages follow, read
    with `jobs_in_buckets`); the owned set is replaced by the pages. Otherwise the jobs
    changed since the cursor (their current rows) and those to stop pinging (`gone`).
    `cursor` goes with the next sync either way."""

    full: bool
    cursor: int
    jobs: list[Job]
    gone: list[UUID] = field(default_factory=list)
    next: UUID | None = None

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> Changes:
        return cls(bool(out["full"]), int(out["cursor"]),
                   [job_from_json(row) for row in out["jobs"]],
                   [UUID(x) for x in out.get("gone") or ()],
                   UUID(out["next"]) if out.get("next") else None)


@dataclass(frozen=True)
class Applied:
    """What a poller has taken up from its last fleet sync (epoch 0: nothing yet): its
    heartbeat reports it, so the operator and leaving replicas know what others apply."""

    epoch: int = 0
    counts: tuple[int, ...] = ()
    at: datetime | None = None  # the database time of that sync


@dataclass(frozen=True)
class FleetSync:
    """One sync in a fleet: the topology, the live replicas, the buckets this replica pings
    with them, what changed in those buckets (or the first page of a full read), and for a
    leaving replica whether its share has been taken over."""

    counts: tuple[int, ...]
    epoch: int
    live: tuple[int, ...]
    buckets: tuple[int, ...]
    failover_s: int
    now: datetime
    taken_over: bool
    changes: Changes

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> FleetSync:
        return cls(tuple(int(n) for n in out["counts"]), int(out["epoch"]),
                   tuple(int(r) for r in out["live"]), tuple(int(b) for b in out["buckets"]),
                   int(out["failover_s"]), datetime.fromisoformat(out["now"]),
                   bool(out["taken_over"]), Changes.from_json(out))


PageFetch = Callable[[UUID | None], Awaitable[JobsPage]]


async def pages(fetch: PageFetch, first: JobsPage | Changes) -> AsyncIterator[list[Job]]:
    """The pages of a full read, from its first page on, in (bucket, id) order (one call
    per page), as they arrive."""
    yield list(first.jobs)
    after = first.next
    while after is not None:
        page = await fetch(after)
        yield page.jobs
        after = page.next


@dataclass(frozen=True)
class FleetState:
    """What the operator reads each sync: topology, heartbeats, load, stale jobs."""

    counts: tuple[int, ...] | None
    epoch: int
    seen: dict[int, int]  # replica id → the topology epoch it last applied
    reporting: int  # replicas whose last heartbeat is recent
    running_jobs: int
    stale_jobs: int
    failover_s: int = 15
    silent: dict[int, float] = field(default_factory=dict)  # replica → seconds since sync

    @classmethod
    def from_json(cls, out: dict[str, Any], fresh_s: float = 60.0) -> FleetState:
        replicas = out.get("replicas") or []
        counts = tuple(out["counts"]) if out.get("counts") else None
        failover = int(out.get("failover_s") or 15)
        size = max(counts) if counts else 0
        return cls(
            counts=counts,
            epoch=int(out.get("epoch") or 0),
            seen={int(r["replica_id"]): int(r["epoch"]) for r in replicas},
            reporting=sum(1 for r in replicas if float(r["age_s"]) < fresh_s),
            running_jobs=int(out["running_jobs"]),
            stale_jobs=int(out["stale_jobs"]),
            failover_s=failover,
            silent={int(r["replica_id"]): float(r["age_s"]) for r in replicas
                    if int(r["replica_id"]) < size and not r.get("leaving")
                    and float(r["age_s"]) > failover},
        )


@dataclass(frozen=True)
class OutboxState:
    """Alerts and completion notices waiting for delivery, database-wide."""

    pending: int
    oldest_pending_s: float
    failed_24h: int  # failed for good in the last 24 hours

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> OutboxState:
        return cls(int(out["pending"]), float(out["oldest_pending_s"]),
                   int(out["failed_24h"]))


def job_from_json(row: dict[str, Any]) -> Job:
    """A job row as JSON (PostgREST, or jsonb from the SQL API) → Job."""
    return Job(
        id=UUID(row["id"]),
        target_ip=row["target_ip"],
        cadence_seconds=int(row["cadence_seconds"]),
        duration_minutes=int(row["duration_minutes"]),
        started_at=datetime.fromisoformat(row["started_at"]),
        last_ping_at=(datetime.fromisoformat(row["last_ping_at"])
                      if row["last_ping_at"] else None),
    )


def raise_if_cancelling() -> None:
    """After a failed store call: a client library that turned our cancellation into its
    own error must not keep a stopping loop going."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def check_api_version(found: int, needed: int = API_VERSION) -> None:
    """The SQL API only ever grows: any version at least `needed` will do."""
    if found < needed:
        raise StoreMisconfigured(
            f"the database has SQL API version {found}, this release needs {needed} or "
            "later: run `python -m poller migrate` with this release"
        )


MIGRATE_HINT = (
    "the poller's SQL API is missing from the database: run `python -m poller migrate` "
    "(or paste poller/sql/*.sql, then poller/sql/repeatable/*.sql, into the Supabase SQL "
    "editor)"
)


def make_store(settings: Settings) -> Store:
    """The store for the configured transport (the poller's and the operator's)."""
    timeout = settings.db_timeout_ms / 1000
    if settings.transport == "postgres":
        from .postgres import PostgresStore

        assert settings.database_url is not None
        return PostgresStore(settings.database_url.get_secret_value(), timeout,
                             prepared_statements=settings.database_prepared_statements,
                             alert_settle_s=settings.alert_settle_s)
    from .supabase import SupabaseStore

    assert settings.supabase_url is not None and settings.supabase_service_role_key is not None
    return SupabaseStore(settings.supabase_url,
                         settings.supabase_service_role_key.get_secret_value(), timeout,
                         alert_settle_s=settings.alert_settle_s)
