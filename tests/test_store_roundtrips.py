"""Round trips of the direct transport, counted by a TCP proxy in front of a real Postgres:
each store call is one round trip, with the pooler-safe default (no named statements: the
statement is parsed again in the same flight as its execution) as with prepared
statements. asyncpg's own way without named statements is two (a describe, then the
execution); `_OneTripConnection` keeps the description. Its answers are those of a fresh
statement each time."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from poller.models import Sample, SampleStatus
from poller.partition import BUCKETS
from poller.store import Applied
from poller.store.postgres import PostgresStore
from tests.support.db import add_jobs
from tests.support.tcp_proxy import RoundTripProxy

FLEET = "soundcheck/rt"


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[tuple[RoundTripProxy, str]]:
    parts = urlsplit(dsn)
    counting = RoundTripProxy(parts.port or 5432)
    await counting.start()
    try:
        yield counting, urlunsplit(parts._replace(
            netloc=f"{parts.username}@127.0.0.1:{counting.port}"))
    finally:
        await counting.stop()


@pytest.mark.parametrize("prepared", [False, True], ids=["pooler-safe", "prepared"])
async def test_each_call_is_one_round_trip(conn: asyncpg.Connection, prepared: bool,
                                           proxy: tuple[RoundTripProxy, str]) -> None:
    counting, via_proxy = proxy
    [job] = await add_jobs(conn, ["127.0.0.1"])
    await conn.fetchval("select poller_publish_topology($1, '{1}')", FLEET)
    store = PostgresStore(via_proxy, timeout_s=5.0, pool_size=1, prepared_statements=prepared)
    await store.open()
    now = time.time()
    calls: dict[str, Callable[[int], Awaitable[Any]]] = {
        "record_batch": lambda seq: store.record_batch(
            [Sample(job, seq, SampleStatus.SUCCESS, 1.5, None, now)], []),
        "job_changes": lambda seq: store.job_changes(list(range(BUCKETS)), None, 100),
        "jobs_in_buckets": lambda seq: store.jobs_in_buckets(list(range(BUCKETS)), None, 100),
        "fleet_sync": lambda seq: store.fleet_sync(FLEET, 0, Applied(), False, 1, "t", 100,
                                                   None, []),
        "outbox_state": lambda seq: store.outbox_state(),
    }
    try:
        for name, call in calls.items():
            first = await call(0)  # connects and learns the types: not counted
            before = counting.round_trips
            answers = [await call(seq) for seq in range(1, 6)]
            assert counting.round_trips - before == 5, name
            if name == "record_batch":  # each a fresh execution: each sample inserted
                assert [a.inserted for a in [first, *answers]] == [1] * 6
            elif name in ("job_changes", "jobs_in_buckets"):
                assert all(a.jobs == first.jobs for a in answers)
    finally:
        await store.close()
    assert await conn.fetchval("select count(*) from samples where job_id = $1", job) == 6
