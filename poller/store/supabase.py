"""Supabase transport: the same SQL API called as PostgREST RPCs through supabase-py.

One async client per process; every call is one `POST /rest/v1/rpc/<fn>`. Deliberate
client settings (docs/supabase.md, "Supabase"):
- timeout DB_TIMEOUT_MS on connect, read, write and pool wait (the library's default is
  120 s, which would hold a batch far longer than a retry would);
- no library retries (`postgrest_client_retry=False`): the recorder and the sync loop
  already retry with capped backoff and keep samples buffered, and a retry inside the
  client would stall the loop that is waiting on it.

HTTP status decides what a failure means: 401/403 (key rejected) and 404 (SQL API missing)
need someone to act; 5xx, timeouts and connection errors are retried. The status is taken
from the HTTP response itself (an httpx response hook), because PostgREST's error body
does not carry it. Error texts built here include the PostgREST code and message, never a
request header, so the key cannot leak through them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from ..models import Claim, RecordResult, Sample
from . import (
    MIGRATE_HINT,
    Applied,
    Changes,
    FleetState,
    FleetSync,
    JobsPage,
    OutboxState,
    StoreMisconfigured,
    StoreUnavailable,
    error_for_sqlstate,
)


def _xid(cursor: int | None) -> str | None:
    """A cursor (a transaction id, xid8) as PostgREST passes it on: text."""
    return None if cursor is None else str(cursor)


class _HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body

    def code(self) -> str:
        """PostgREST's `code`: an SQLSTATE for database errors, PGRSTnnn for its own."""
        try:
            code = json.loads(self.body).get("code")
        except (ValueError, AttributeError, RecursionError):
            return ""
        return code if isinstance(code, str) else ""

    def describe(self) -> str:
        try:
            err = json.loads(self.body)
            parts = [str(err.get(k))[:500] for k in ("code", "message") if err.get(k)]
            text = ": ".join(parts) or "no details"
        except (ValueError, AttributeError, RecursionError):
            text = "no details"
        return f"HTTP {self.status} ({text})"


async def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 300:
        await response.aread()
        raise _HttpError(response.status_code, response.content)


class SupabaseStore:
    def __init__(self, url: str, key: str, timeout_s: float, max_connections: int = 4,
                 alert_settle_s: int = 60) -> None:
        self._url = url
        self._settle_s = alert_settle_s
        self._key = key
        self._timeout = timeout_s
        self._max_connections = max_connections
        self._http: httpx.AsyncClient | None = None
        self._client: AsyncClient | None = None

    async def open(self) -> None:
        # Our own httpx client, so the timeout, pool and response hook are ours.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(max_connections=self._max_connections),
            event_hooks={"response": [_raise_for_status]},
            follow_redirects=False,
        )
        options = AsyncClientOptions(
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
            httpx_client=self._http,
            # An explicit Authorization header: the client then never asks the auth
            # service for a session at start (the service role needs none).
            headers={"Authorization": f"Bearer {self._key}"},
        )
        self._client = await acreate_client(self._url, self._key, options)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._client = None

    async def _rpc(self, fn: str, args: dict[str, Any]) -> Any:
        if self._client is None:
            raise RuntimeError("SupabaseStore.open() was not called")
        try:
            response = await self._client.rpc(fn, args).execute()
        except _HttpError as exc:
            if exc.status in (401, 403):
                raise StoreMisconfigured(
                    f"Supabase refused the service-role key: {exc.describe()}; "
                    "check SUPABASE_SERVICE_ROLE_KEY"
                ) from None
            if exc.status == 404:
                raise StoreMisconfigured(f"{MIGRATE_HINT} ({exc.describe()})") from None
            code = exc.code()
            if 400 <= exc.status < 500 and len(code) == 5 and not code.startswith("PGRST"):
                raise error_for_sqlstate(code, f"Supabase answered {exc.describe()}") from None
            if 400 <= exc.status < 500 and exc.status not in (408, 429):
                # The gateway rejected the request itself: a bug or a version mismatch.
                raise StoreMisconfigured(f"Supabase answered {exc.describe()}") from None
            raise StoreUnavailable(f"Supabase answered {exc.describe()}") from None
        except httpx.TimeoutException as exc:
            raise StoreUnavailable(f"Supabase did not answer in time ({type(exc).__name__})"
                                   ) from None
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"Supabase unreachable ({type(exc).__name__})") from None
        except (ValueError, RecursionError) as exc:  # a body that is not JSON
            raise StoreUnavailable(f"Supabase sent an unreadable answer ({type(exc).__name__})"
                                   ) from None
        return response.data

    async def api_version(self) -> int:
        return int(await self._rpc("poller_api_version", {}))

    async def job_changes(self, buckets: Sequence[int], cursor: int | None,
                          limit: int) -> Changes:
        return Changes.from_json(await self._rpc("poller_job_changes", {
            "p_buckets": list(buckets), "p_cursor": _xid(cursor), "p_limit": limit}))

    async def jobs_in_buckets(self, buckets: Sequence[int], after: UUID | None,
                              limit: int) -> JobsPage:
        return JobsPage.from_json(await self._rpc("poller_jobs_in_buckets", {
            "p_buckets": list(buckets), "p_after": str(after) if after else None,
            "p_limit": limit}))

    async def fleet_sync(self, fleet: str, replica_id: int, applied: Applied, leaving: bool,
                         owned_jobs: int, version: str, limit: int, cursor: int | None,
                         buckets: Sequence[int]) -> FleetSync:
        return FleetSync.from_json(await self._rpc("poller_fleet_sync_delta", {
            "p_fleet": fleet, "p_replica_id": replica_id, "p_applied_epoch": applied.epoch,
            "p_applied_counts": list(applied.counts),
            "p_applied_at": applied.at.isoformat() if applied.at else None,
            "p_leaving": leaving, "p_owned_jobs": owned_jobs, "p_version": version,
            "p_limit": limit, "p_cursor": _xid(cursor), "p_buckets": list(buckets)}))

    async def fleet_state(self, fleet: str) -> FleetState:
        return FleetState.from_json(await self._rpc("poller_fleet_state", {"p_fleet": fleet}))

    async def publish_topology(self, fleet: str, counts: Sequence[int]) -> int:
        return int(await self._rpc("poller_publish_topology",
                                   {"p_fleet": fleet, "p_counts": list(counts)}))

    async def set_failover(self, fleet: str, failover_s: int) -> None:
        await self._rpc("poller_set_failover", {"p_fleet": fleet, "p_failover_s": failover_s})

    async def record_batch(
        self, samples: Sequence[Sample], complete_job_ids: Sequence[UUID]
    ) -> RecordResult:
        # Column arrays like the direct transport; floats and None only (the client's JSON
        # encoder takes no Decimal or NaN).
        out = await self._rpc("poller_record_samples", {
            "p_job_ids": [str(s.job_id) for s in samples],
            "p_sequence_numbers": [s.sequence_number for s in samples],
            "p_statuses": [s.status.value for s in samples],
            "p_rtt_ms": [s.rtt_ms for s in samples],
            "p_jitter_ms": [s.jitter_ms for s in samples],
            "p_recorded_at": [datetime.fromtimestamp(s.recorded_at, UTC).isoformat()
                              for s in samples],
            "p_complete_job_ids": [str(j) for j in complete_job_ids],
            "p_settle_s": self._settle_s,
        })
        return RecordResult.from_json(out)

    async def outbox_state(self) -> OutboxState:
        return OutboxState.from_json(await self._rpc("poller_outbox_state", {}))

    async def claim_notices(self, claimer: str, limit: int, lease_s: int) -> Claim:
        return Claim.from_json(await self._rpc("poller_claim_notices", {
            "p_claimer": claimer, "p_limit": limit, "p_lease_s": lease_s}))

    async def finish_notice(self, notice_id: int, claimer: str, done: Sequence[str],
                            error: str | None, retry_s: float, max_attempts: int) -> str | None:
        out = await self._rpc("poller_finish_notice", {
            "p_id": notice_id, "p_claimer": claimer, "p_done": list(done), "p_error": error,
            "p_retry_s": retry_s, "p_max_attempts": max_attempts})
        return None if out is None else str(out)
