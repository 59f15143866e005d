"""The SQL API behind one small interface, whatever the transport (asyncpg or PostgREST).

Errors are sorted into two kinds so callers can act on them without knowing the transport:
`StoreUnavailable` (outage, timeout, 5xx: retry, keep samples) and `StoreMisconfigured`
(bad credentials, SQL API missing or too old: tell the operator what to fix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from ..models import Job, RecordResult, Sample

API_VERSION = 1  # the oldest poller_api_version() the poller works with
TOPOLOGY_API_VERSION = 3  # adds topology and heartbeats (pollers with FLEET_NAME)


class StoreError(Exception):
    """A call to the SQL API failed."""


class StoreUnavailable(StoreError):
    """The database could not be reached or did not answer in time; worth retrying."""


class StoreMisconfigured(StoreError):
    """Retrying will not help until someone fixes credentials or applies migrations."""


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def api_version(self) -> int: ...

    async def sync_jobs(self, replica_id: int, replica_counts: Sequence[int]) -> list[Job]: ...

    async def record_batch(
        self, samples: Sequence[Sample], complete_job_ids: Sequence[UUID]
    ) -> RecordResult: ...

    async def sync_fleet(self, fleet: str, replica_id: int, owned_jobs: int,
                         version: str) -> FleetSync: ...

    async def fleet_state(self, fleet: str) -> FleetState: ...

    async def publish_topology(self, fleet: str, counts: Sequence[int]) -> int: ...


@dataclass(frozen=True)
class FleetSync:
    """One sync in a fleet: the topology to apply (its heartbeat is recorded) and the jobs."""

    counts: tuple[int, ...]
    epoch: int
    jobs: list[Job]

    @classmethod
    def from_json(cls, out: dict[str, Any]) -> FleetSync:
        return cls(tuple(int(n) for n in out["counts"]), int(out["epoch"]),
                   [job_from_json(row) for row in out["jobs"]])


@dataclass(frozen=True)
class FleetState:
    """What the operator reads each sync: topology, heartbeats, load, stale jobs."""

    counts: tuple[int, ...] | None
    epoch: int
    seen: dict[int, int]  # replica id → the topology epoch it last synced with
    reporting: int  # replicas whose last heartbeat is recent
    running_jobs: int
    stale_jobs: int

    @classmethod
    def from_json(cls, out: dict[str, Any], fresh_s: float = 60.0) -> FleetState:
        replicas = out.get("replicas") or []
        return cls(
            counts=tuple(out["counts"]) if out.get("counts") else None,
            epoch=int(out.get("epoch") or 0),
            seen={int(r["replica_id"]): int(r["epoch"]) for r in replicas},
            reporting=sum(1 for r in replicas if float(r["age_s"]) < fresh_s),
            running_jobs=int(out["running_jobs"]),
            stale_jobs=int(out["stale_jobs"]),
        )


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


def check_api_version(found: int, needed: int = API_VERSION) -> None:
    """The SQL API only ever grows: any version at least `needed` will do."""
    if found < needed:
        raise StoreMisconfigured(
            f"the database has SQL API version {found}, this release needs {needed} or "
            "later: run `python -m poller migrate` with this release"
        )


MIGRATE_HINT = (
    "the poller's SQL API is missing from the database: run `python -m poller migrate` "
    "(or paste poller/sql/*.sql into the Supabase SQL editor)"
)
