"""Direct Postgres transport (asyncpg).

Safe behind a transaction-mode pooler (Supabase's, pgbouncer): by default no named
prepared statements, no LISTEN, no session state; every call is one function call, atomic
by itself, so no explicit transaction (and no extra BEGIN/COMMIT round trips), and one
round trip (`_OneTripConnection`). `prepared_statements=True` caches named statements
instead, for direct connections or poolers that keep them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg

from ..models import Claim, Job, RecordResult, Sample
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

# Ping times travel as Unix seconds and become timestamps in the database, in C: a
# datetime per sample cost the poller 1.8 us to make and encode (about 5 % of its CPU per
# ping at 15,000 pings/s), a float 0.2 us.
_RECORD_SQL = (
    "select poller_record_samples($1::uuid[], $2::int[], $3::text[], $4::float8[], "
    "$5::float8[], array(select to_timestamp(t) from unnest($6::float8[]) "
    "with ordinality as u(t, n) order by n), $7::uuid[], $8::int)"
)
# The same SQL API functions as the Supabase transport calls; the JSON page is turned back
# into typed rows in the database, which asyncpg decodes in C: far cheaper than parsing
# JSON in Python, and no stall of the event loop on a page of ten thousand jobs.
_JOB_COLUMNS = ("id uuid, target_ip text, cadence_seconds int, duration_minutes int, "
                "started_at timestamptz, last_ping_at timestamptz")
_JOB_NAMES = "id, target_ip, cadence_seconds, duration_minutes, started_at, last_ping_at"


def _with_head(call: str, head: str) -> str:
    """SQL: `call` once (MATERIALIZED: a subquery in FROM would be pulled up and its stable
    function evaluated for every job of the page), its jobs as typed rows in page order,
    and the call's own columns `head` on the first row only (a row of nulls when there is
    no job). On every row, a page of 5,000 jobs carried 5,000 copies of the bucket list,
    up to 1,024 ints each: 140 MB for the poller to decode."""
    return (
        f"with c as materialized (select {call} as s) "
        f"select x.*, h.* from c "
        f"left join lateral rows from (jsonb_to_recordset(c.s->'jobs') as ({_JOB_COLUMNS})) "
        f"with ordinality as x({_JOB_NAMES}, n) on true "
        f"left join lateral (select {head}) as h on x.n is null or x.n = 1 "
        "order by x.n nulls first")


_BUCKETS_SQL = _with_head("poller_jobs_in_buckets($1::int[], $2::uuid, $3::int)",
                          "c.s->>'next' as next")
# What changed (or a full read's first page), and the columns of Changes.
_CHANGES_COLUMNS = (
    "(c.s->>'full')::bool as full, (c.s->>'cursor')::bigint as cursor, "
    "array(select jsonb_array_elements_text(c.s->'gone'))::uuid[] as gone, "
    "c.s->>'next' as next"
)
_CHANGES_SQL = _with_head("poller_job_changes($1::int[], $2::xid8, $3::int)",
                          _CHANGES_COLUMNS)
_FLEET_SQL = _with_head(
    "poller_fleet_sync_delta($1, $2, $3, $4::int[], $5, $6, $7, $8, $9, $10::xid8, "
    "$11::int[])",
    f"{_CHANGES_COLUMNS}, "
    "array(select jsonb_array_elements_text(c.s->'counts'))::int[] as counts, "
    "array(select jsonb_array_elements_text(c.s->'live'))::int[] as live, "
    "array(select jsonb_array_elements_text(c.s->'buckets'))::int[] as buckets, "
    "(c.s->>'epoch')::bigint as epoch, (c.s->>'failover_s')::int as failover_s, "
    "(c.s->>'now')::timestamptz as now, (c.s->>'taken_over')::bool as taken_over")


def _jobs(rows: list[asyncpg.Record]) -> list[Job]:
    """The job rows of a result (one with no job has one row of nulls).

    Ids become plain `uuid.UUID`s: the scheduler keeps one per owned job as its key, and
    asyncpg's own UUID, once hashed, keeps its bytes, its int and its hash (152 bytes
    against 100: 50 MB more at a million jobs)."""
    return [Job(UUID(int=r["id"].int), r["target_ip"], r["cadence_seconds"],
                r["duration_minutes"], r["started_at"], r["last_ping_at"])
            for r in rows if r["id"] is not None]


def _changes(rows: list[asyncpg.Record]) -> Changes:
    head = rows[0]
    return Changes(head["full"], head["cursor"], _jobs(rows), list(head["gone"]),
                   UUID(head["next"]) if head["next"] else None)


def _page(rows: list[asyncpg.Record]) -> JobsPage:
    nxt = rows[0]["next"]
    return JobsPage(_jobs(rows), UUID(nxt) if nxt else None)


# SQLSTATE classes that mean "fix the setup", not "try again later".
_MISCONFIGURED = (
    asyncpg.UndefinedFunctionError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
)
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.AdminShutdownError,
)


class _OneTripConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg without a statement cache (the pooler-safe setting) spends two round trips
    on each call: Parse+Describe to learn the types, then Parse+Bind+Execute (it parses the
    unnamed statement again because a transaction-mode pooler may run the second flight on
    another server connection). The store sends a handful of fixed queries whose types are
    spelled out in their text, so the described statement is kept per connection and each
    call is the second flight alone: one round trip, and still nothing named left in any
    session. asyncpg has no public switch for this; it overrides `_get_statement`, the
    one place asyncpg looks statements up, and `tests/test_store_roundtrips.py` counts
    the round trips, so an asyncpg that changes it shows there (calls stay correct, at
    two round trips)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._described: dict[tuple[object, ...], object] = {}

    async def _get_statement(self, query: str, timeout: float | None, *,
                             named: object = False, use_cache: bool = True,
                             **kwargs: object) -> object:
        # (An asyncpg without these internals gets its own behaviour: two round trips.)
        if named or not use_cache or getattr(self, "_stmt_cache_enabled", True):
            return await super()._get_statement(query, timeout, named=named,
                                                use_cache=use_cache, **kwargs)
        key = (query, *sorted(kwargs.items()))
        statement = self._described.get(key)
        if statement is None or getattr(statement, "closed", False):
            # Unnamed, and marked by asyncpg to be parsed again with each execution.
            statement = await super()._get_statement(query, timeout, use_cache=use_cache,
                                                     **kwargs)
            if len(self._described) < _DESCRIBED_MAX:
                self._described[key] = statement
        return statement

    def _drop_local_statement_cache(self) -> None:
        # Types changed (ALTER TYPE, a reconnect's reload): describe again.
        self._described.clear()
        super()._drop_local_statement_cache()


_DESCRIBED_MAX = 64  # the store's queries are a fixed handful; anything else is not kept


async def _keep(conn: asyncpg.Connection) -> None:
    """Pool release hook: asyncpg's default reset costs a round trip per call (RESET ALL,
    UNLISTEN …); the poller keeps no session state, so there is nothing to reset."""


class PostgresStore:
    def __init__(self, dsn: str, timeout_s: float, pool_size: int = 4,
                 prepared_statements: bool = False, alert_settle_s: int = 60) -> None:
        self._dsn = dsn
        self._settle_s = alert_settle_s
        self._statement_cache = 100 if prepared_statements else 0
        self._timeout = timeout_s
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        # min_size=0: creating the pool never connects, so a database that is down at
        # start-up is an error of the first call (retried), not a crash.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            statement_cache_size=self._statement_cache,
            command_timeout=self._timeout,
            timeout=self._timeout,
            max_inactive_connection_lifetime=60,
            server_settings={"application_name": "soundcheck-poller"},
            reset=_keep,
            connection_class=_OneTripConnection,
        )

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self._timeout)
            except (TimeoutError, OSError):
                self._pool.terminate()
            self._pool = None

    async def _call(self, method: str, sql: str, *args: object) -> Any:
        # Any: asyncpg's results are untyped (records, JSON text, scalars by the SQL).
        if self._pool is None:
            raise RuntimeError("PostgresStore.open() was not called")
        try:
            async with asyncio.timeout(self._timeout * 2):
                return await self._on_connection(method, sql, args)
        except asyncpg.UndefinedFunctionError as exc:
            raise StoreMisconfigured(f"{MIGRATE_HINT} ({exc.__class__.__name__})") from None
        except _MISCONFIGURED as exc:
            raise StoreMisconfigured(f"database refused the poller: {exc}") from None
        except TimeoutError:
            raise StoreUnavailable("the database did not answer in time "
                                   f"(DB_TIMEOUT_MS={self._timeout * 1000:g})") from None
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from None
        except asyncpg.PostgresError as exc:
            raise error_for_sqlstate(
                exc.sqlstate or "XX000",
                f"{exc.__class__.__name__} (SQLSTATE {exc.sqlstate}): {exc}") from None
        except Exception as exc:
            # asyncpg's own state errors (InternalClientError "cannot switch to state …",
            # seen after a server restart) and anything else unforeseen: an outage of this
            # call, never an exception that kills the loop calling it.
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from None

    async def _on_connection(self, method: str, sql: str, args: tuple[object, ...]) -> object:
        assert self._pool is not None
        conn = await self._pool.acquire(timeout=self._timeout)
        try:
            return await getattr(conn, method)(sql, *args, timeout=self._timeout)
        except BaseException:
            # A connection whose call failed or was cancelled may still be mid-protocol;
            # handing it to the next caller is what produced "another operation is in
            # progress". Close it; the pool opens a fresh one when needed.
            conn.terminate()
            raise
        finally:
            await self._pool.release(conn, timeout=self._timeout)

    async def api_version(self) -> int:
        return int(await self._call("fetchval", "select poller_api_version()"))

    async def job_changes(self, buckets: Sequence[int], cursor: int | None,
                          limit: int) -> Changes:
        rows = await self._call("fetch", _CHANGES_SQL, list(buckets), cursor, limit)
        return _changes(rows)

    async def jobs_in_buckets(self, buckets: Sequence[int], after: UUID | None,
                              limit: int) -> JobsPage:
        rows = await self._call("fetch", _BUCKETS_SQL, list(buckets), after, limit)
        return _page(rows)

    async def fleet_sync(self, fleet: str, replica_id: int, applied: Applied, leaving: bool,
                         owned_jobs: int, version: str, limit: int, cursor: int | None,
                         buckets: Sequence[int]) -> FleetSync:
        rows = await self._call("fetch", _FLEET_SQL, fleet, replica_id, applied.epoch,
                                list(applied.counts), applied.at, leaving, owned_jobs,
                                version, limit, cursor, list(buckets))
        s = rows[0]
        return FleetSync(tuple(s["counts"]), s["epoch"], tuple(s["live"]), tuple(s["buckets"]),
                         s["failover_s"], s["now"], s["taken_over"], _changes(rows))

    async def fleet_state(self, fleet: str) -> FleetState:
        raw = await self._call("fetchval", "select poller_fleet_state($1)", fleet)
        return FleetState.from_json(json.loads(raw))

    async def publish_topology(self, fleet: str, counts: Sequence[int]) -> int:
        return int(await self._call(
            "fetchval", "select poller_publish_topology($1, $2::int[])", fleet, list(counts)))

    async def set_failover(self, fleet: str, failover_s: int) -> None:
        await self._call("execute", "select poller_set_failover($1, $2)", fleet, failover_s)

    async def record_batch(
        self, samples: Sequence[Sample], complete_job_ids: Sequence[UUID]
    ) -> RecordResult:
        # One column array per field, transposed in C; a status is a str (StrEnum), sent
        # as its text.
        ids, seqs, statuses, rtts, jitters, ats = (
            zip(*samples, strict=True) if samples else ((),) * 6)
        raw = await self._call("fetchval", _RECORD_SQL, ids, seqs, statuses, rtts, jitters,
                               ats, list(complete_job_ids), self._settle_s)
        return RecordResult.from_json(json.loads(raw))

    async def outbox_state(self) -> OutboxState:
        raw = await self._call("fetchval", "select poller_outbox_state()")
        return OutboxState.from_json(json.loads(raw))

    async def claim_notices(self, claimer: str, limit: int, lease_s: int) -> Claim:
        raw = await self._call("fetchval", "select poller_claim_notices($1, $2, $3)",
                               claimer, limit, lease_s)
        return Claim.from_json(json.loads(raw))

    async def finish_notice(self, notice_id: int, claimer: str, done: Sequence[str],
                            error: str | None, retry_s: float, max_attempts: int) -> str | None:
        outcome: str | None = await self._call(
            "fetchval", "select poller_finish_notice($1, $2, $3::text[], $4, $5::float8, $6)",
            notice_id, claimer, list(done), error, retry_s, max_attempts)
        return outcome
