"""The SQL API behind one small interface, whatever the transport (asyncpg or PostgREST).

Errors are sorted into two kinds so callers can act on them without knowing the transport:
`StoreUnavailable` (outage, timeout, 5xx: retry, keep samples) and `StoreMisconfigured`
(bad credentials, SQL API missing or too old: tell the operator what to fix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

from ..models import Job, RecordResult, Sample

API_VERSION = 1  # the poller_api_version() this code needs


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


def check_api_version(found: int) -> None:
    if found != API_VERSION:
        raise StoreMisconfigured(
            f"the database has SQL API version {found}, this poller needs {API_VERSION}: "
            "run `python -m poller migrate` with this release"
        )


MIGRATE_HINT = (
    "the poller's SQL API is missing from the database: run `python -m poller migrate` "
    "(or paste poller/sql/*.sql into the Supabase SQL editor)"
)
