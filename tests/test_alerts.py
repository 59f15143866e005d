"""Offline/recovery alerts and the completion summary, decided in the database
(poller/sql/repeatable/40_alerts.sql) and checked against plain reference models
(tests/support/alert_model.py): over sequences with system errors and gaps, written in any
batch order, replayed, and by two connections racing."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.localpg import LocalPostgres
from poller.models import JobSummary
from poller.notices.summary import verdict
from tests.conftest import TEMPLATE
from tests.support.alert_model import Statuses, summary, transitions
from tests.support.db import RECORD_SAMPLES, add_jobs

STATUS = st.sampled_from(["success", "missed", "system_error", None])


@pytest.fixture(scope="module")
def alerts_dsn(pg_server: LocalPostgres) -> Iterator[str]:
    """One migrated database for the property tests (each example makes its own jobs)."""
    name = "alerts_props"

    async def run(sql: str) -> None:
        admin = await asyncpg.connect(pg_server.dsn)
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    asyncio.run(run(f"create database {name} template {TEMPLATE}"))
    yield f"postgresql://postgres@127.0.0.1:{pg_server.port}/{name}"
    asyncio.run(run(f"drop database {name} with (force)"))


async def _job(conn: asyncpg.Connection, started: datetime, state: str = "ok",
               on_offline: bool = True, on_recovery: bool = True) -> UUID:
    [job] = await add_jobs(conn, ["192.0.2.1"], started_at=started)
    await conn.execute("update jobs set alert_state = $2, alert_on_offline = $3, "
                       "alert_on_recovery = $4 where id = $1", job, state, on_offline,
                       on_recovery)
    return job


async def _write(conn: asyncpg.Connection, job: UUID, started: datetime, statuses: Statuses,
                 seqs: Sequence[int], settle_s: int = 3600,
                 complete: bool = False) -> dict[str, object]:
    seqs = [k for k in seqs if statuses[k] is not None]
    for attempt in range(20):  # what the recorder does on a deadlock: write the batch again
        try:
            raw = await conn.fetchval(
                RECORD_SAMPLES, [job] * len(seqs), seqs, [statuses[k] for k in seqs],
                [1.0 if statuses[k] == "success" else None for k in seqs], [None] * len(seqs),
                [started + timedelta(seconds=k) for k in seqs], [job] if complete else [],
                settle_s)
            result: dict[str, Any] = json.loads(raw)
            return result
        except asyncpg.DeadlockDetectedError:
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("deadlocked 20 times")


async def _complete(conn: asyncpg.Connection, job: UUID, started: datetime,
                    statuses: Statuses) -> None:
    """End the job and complete it through a batch: what waited behind a hole is
    evaluated then."""
    await conn.execute("update jobs set duration_minutes = 0 where id = $1", job)
    await _write(conn, job, started, statuses, [], complete=True)


async def _alerts(conn: asyncpg.Connection, job: UUID,
                  started: datetime) -> list[tuple[str, int]]:
    rows = await conn.fetch("select alert_type, triggered_at from alerts where job_id = $1 "
                            "order by triggered_at", job)
    return [(r["alert_type"], round((r["triggered_at"] - started).total_seconds()))
            for r in rows]


@pytest.mark.slow  # seconds: out of the fast lane
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(statuses=st.lists(STATUS, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       seed=st.integers(0, 2**32), state=st.sampled_from(["ok", "offline_alerted"]),
       replays=st.integers(0, 3))
def test_batches_in_any_order_make_the_transitions_of_the_sequence(
        alerts_dsn: str, statuses: list[str | None], cuts: list[int], seed: int, state: str,
        replays: int) -> None:
    expected, final = transitions(statuses, state)
    bounds = sorted({0, len(statuses), *(c for c in cuts if c < len(statuses))})
    batches = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
    rng = random.Random(seed)
    rng.shuffle(batches)
    batches += [rng.choice(batches) for _ in range(replays if batches else 0)]  # replayed

    async def check() -> None:
        conn = await asyncpg.connect(alerts_dsn)
        try:
            # Started just now: every hole waits for its sample (settle 3600 s).
            started = datetime.now(UTC) - timedelta(seconds=2)
            job = await _job(conn, started, state)
            for batch in batches:
                await _write(conn, job, started, statuses, batch)
            await _complete(conn, job, started, statuses)
            assert await _alerts(conn, job, started) == expected
            assert await conn.fetchval("select alert_state::text from jobs where id = $1",
                                       job) == final
            # One notice per alert, one completion notice.
            assert await conn.fetchval(
                "select count(*) from poller_outbox where job_id = $1 and kind <> "
                "'completion'", job) == len(expected)
            assert await conn.fetchval(
                "select count(*) from poller_outbox where job_id = $1 and kind = "
                "'completion'", job) == 1
        finally:
            await conn.close()

    asyncio.run(check())


async def test_in_order_batches_alert_as_the_samples_arrive(conn: asyncpg.Connection) -> None:
    started = datetime.now(UTC) - timedelta(seconds=2)
    job = await _job(conn, started)
    statuses = ["missed"] * 4 + ["system_error", "missed", "success"] + ["success"] * 4
    out = await _write(conn, job, started, statuses, range(5))
    assert out["offline"] == 0 and await _alerts(conn, job, started) == []
    out = await _write(conn, job, started, statuses, [5])  # the 5th miss, past a system error
    assert out["offline"] == 1 and await _alerts(conn, job, started) == [("offline", 5)]
    out = await _write(conn, job, started, statuses, range(6, 11))
    assert out["recovery"] == 1
    assert await _alerts(conn, job, started) == [("offline", 5), ("recovery", 10)]
    # The app shows them: pending delivery.
    assert {r["delivery_status"] for r in await conn.fetch("select * from alerts")} == {
        "pending"}


async def test_a_replayed_batch_raises_no_second_alert(conn: asyncpg.Connection) -> None:
    started = datetime.now(UTC) - timedelta(seconds=2)
    job = await _job(conn, started)
    statuses = ["missed"] * 6
    for _ in range(3):
        await _write(conn, job, started, statuses, range(6))
    assert await _alerts(conn, job, started) == [("offline", 4)]


async def test_a_hole_waits_for_its_sample_then_counts_as_a_gap(
        conn: asyncpg.Connection) -> None:
    statuses = ["missed", "missed", None, "missed", "missed", "missed", "success"]
    # Within the settle time the hole at slot 2 holds the evaluation: no alert yet.
    started = datetime.now(UTC) - timedelta(seconds=2)
    job = await _job(conn, started)
    await _write(conn, job, started, statuses, range(7), settle_s=3600)
    assert await _alerts(conn, job, started) == []
    assert await conn.fetchval("select poller_alert_seq from jobs where id = $1", job) == 1
    # Past the settle time it is a gap: neither a trigger nor a break.
    old = datetime.now(UTC) - timedelta(seconds=600)
    job = await _job(conn, old)
    await _write(conn, job, old, statuses, range(7), settle_s=60)
    assert await _alerts(conn, job, old) == [("offline", 5)]


async def test_a_job_held_by_a_hole_costs_a_probe_not_a_read_of_its_samples(
        conn: asyncpg.Connection) -> None:
    # Slot 0 has no sample and is not settled: nothing past it can be evaluated, however
    # many samples wait there. The general evaluation read them all again for each batch;
    # soundcheck_evaluate_alerts passes the job over after one probe for slot 0.
    started = datetime.now(UTC) - timedelta(seconds=2)
    job = await _job(conn, started)
    statuses: list[str | None] = [None, *["success"] * 3000]
    await _write(conn, job, started, statuses, range(1, 3001))
    assert await conn.fetchval("select poller_alert_seq from jobs where id = $1", job) == -1

    async def samples_read() -> int:
        # This backend's counts, flushed at the end of the first statement and read
        # fresh by the second.
        await conn.execute("set stats_fetch_consistency = none; "
                           "select pg_stat_force_next_flush()")
        return int(await conn.fetchval(
            "select coalesce(sum(seq_tup_read), 0) + coalesce(sum(idx_tup_fetch), 0) "
            "from pg_stat_user_tables where relname = 'samples'"))

    async def evaluate(fn: str) -> tuple[dict[str, object], int]:
        """The answer and how many samples the call read."""
        before = await samples_read()
        answer = json.loads(await conn.fetchval(
            f"select {fn}($1::uuid[], null, 3600, false)", [job]))
        return answer, await samples_read() - before

    held, held_read = await evaluate("soundcheck_evaluate_alerts")
    full, full_read = await evaluate("soundcheck_evaluate_alerts_all")
    assert held == full == {"retry": [], "offline": 0, "recovery": 0, "alerts": 0}
    assert (held_read, full_read) == (0, 3000)
    # Filled, the hole lets the evaluation through: by the job's next batch, the cursor is
    # past every sample.
    statuses += ["success"]
    await _write(conn, job, started, ["success"], [0])
    await _write(conn, job, started, statuses, [3001])
    assert await conn.fetchval("select poller_alert_seq from jobs where id = $1", job) == 3001


async def test_alert_flags_decide_the_rows_not_the_state(conn: asyncpg.Connection) -> None:
    started = datetime.now(UTC) - timedelta(seconds=2)
    job = await _job(conn, started, on_offline=False, on_recovery=True)
    statuses = ["missed"] * 5 + ["success"] * 5
    out = await _write(conn, job, started, statuses, range(10))
    assert (out["offline"], out["recovery"]) == (1, 1)  # both transitions were made
    assert await _alerts(conn, job, started) == [("recovery", 9)]  # one row was asked for


async def test_two_writers_racing_make_the_transitions_once(dsn: str) -> None:
    # Two replicas own the same jobs for a while (a handover, a twin pod): each writes
    # every sample, in its own batches, at the same time. The unique key absorbs the
    # duplicates; the cursor makes the transitions once.
    rng = random.Random(7)
    a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        started = datetime.now(UTC) - timedelta(seconds=2)
        jobs = {}
        for _ in range(12):
            statuses = [rng.choice(["success", "missed", "missed", "system_error"])
                        for _ in range(60)]
            jobs[await _job(a, started)] = statuses

        async def writer(conn: asyncpg.Connection, size: int) -> None:
            for start in range(0, 60, size):
                for job, statuses in jobs.items():
                    await _write(conn, job, started, statuses, range(start, start + size))

        await asyncio.gather(writer(a, 3), writer(b, 5))
        for job, statuses in jobs.items():
            await _complete(a, job, started, statuses)
            expected, final = transitions(statuses)
            assert await _alerts(a, job, started) == expected, job
            assert await a.fetchval("select alert_state::text from jobs where id = $1",
                                    job) == final
        assert await a.fetchval("select count(*) from poller_outbox where kind = "
                                "'completion'") == len(jobs)
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow  # seconds: out of the fast lane
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(STATUS, st.integers(0, 30_000)), max_size=60))
def test_the_summary_counts_as_the_app_does(alerts_dsn: str,
                                            samples: list[tuple[str | None, int]]) -> None:
    statuses = [s for s, _ in samples]
    rtts = [c / 100 if s == "success" else None for s, c in samples]
    expected = summary(statuses, rtts)

    async def check() -> None:
        conn = await asyncpg.connect(alerts_dsn)
        try:
            started = datetime.now(UTC)
            job = await _job(conn, started)
            seqs = [k for k, s in enumerate(statuses) if s is not None]
            await conn.fetchval(
                RECORD_SAMPLES, [job] * len(seqs), seqs, [statuses[k] for k in seqs],
                [rtts[k] for k in seqs], [None] * len(seqs),
                [started + timedelta(seconds=k) for k in seqs], [], 60)
            got = JobSummary.from_json(json.loads(await conn.fetchval(
                "select soundcheck_job_summary($1)", job)))
        finally:
            await conn.close()
        for key, value in expected.items():
            have = getattr(got, key)
            if key == "avg_rtt_ms" and value is not None:
                assert have == pytest.approx(value, abs=0.011), key
            else:
                assert have == value, key

    asyncio.run(check())


@pytest.mark.parametrize(("success", "missed", "system_error", "p95", "passed", "warned"), [
    (98, 2, 0, 50.0, True, False),     # 2 % loss: the limit passes
    (97, 3, 0, 50.0, False, False),    # 3 %
    (100, 0, 0, 100.0, True, False),   # p95 at the limit
    (100, 0, 0, 100.01, False, False),
    (0, 100, 0, None, False, False),   # everything missed: no RTT, 100 % loss
    (100, 0, 6, None, True, True),     # no RTT measured passes; 5.7 % system errors warn
    (100, 0, 5, 10.0, True, False),    # 4.8 %: no warning
    (0, 0, 10, None, False, True),     # nothing measured does not pass
])
def test_the_verdict(success: int, missed: int, system_error: int, p95: float | None,
                     passed: bool, warned: bool) -> None:
    total = success + missed + system_error
    v = verdict(JobSummary(total, success, missed, system_error, None, None, p95, 0, 0),
                slots=total)
    assert v.passed is passed
    assert (v.warning is not None) is warned
    assert v.coverage == 1.0


@pytest.mark.parametrize(("samples", "slots", "warned"), [
    (61, 61, False), (58, 61, False),  # 95.1 %: no warning
    (57, 61, True),  # 93.4 %
    (7, 61, True),   # the demo's short job: pinged for 7 of its 61 slots
])
def test_coverage_is_stated_and_warned_below_95_percent(samples: int, slots: int,
                                                        warned: bool) -> None:
    v = verdict(JobSummary(samples, samples, 0, 0, 1.0, 1.0, 1.0, 0, 0), slots=slots)
    assert v.coverage == pytest.approx(samples / slots)
    assert v.passed  # the app's PASS/FAIL rules stay as they are
    assert any(f"{samples} of the job's {slots} slots" in w for w in v.warnings) is warned


async def test_a_job_from_before_the_upgrade_is_evaluated_from_its_next_batch(
        conn: asyncpg.Connection) -> None:
    # Running at the upgrade, with history (an offline run long over): a null cursor.
    started = datetime.now(UTC) - timedelta(seconds=2)
    old, quiet = await _job(conn, started), await _job(conn, started)
    history = ["missed"] * 6 + ["success"] * 4
    for job in (old, quiet):
        await conn.execute(
            "insert into samples (job_id, sequence_number, status, recorded_at) "
            "select $1, k, s::sample_status, $2::timestamptz + k * interval '1 second' "
            "from unnest($3::text[]) with ordinality as u(s, k)", job, started, history)
    await conn.execute("update jobs set poller_alert_seq = null where id = any($1::uuid[])",
                       [old, quiet])
    statuses = [*history, None, "success", *["missed"] * 5]  # slot 10: written before too
    await _write(conn, old, started, statuses, range(11, 17))
    # The history raised nothing; the run that started after the upgrade did.
    assert await _alerts(conn, old, started) == [("offline", 16)]
    # A job completed with no batch since the upgrade: its history stays unevaluated.
    await _complete(conn, quiet, started, history)
    assert await _alerts(conn, quiet, started) == []
    assert await conn.fetchval("select alert_state::text from jobs where id = $1",
                               quiet) == "ok"


async def test_new_jobs_start_with_the_cursor_before_slot_zero(
        conn: asyncpg.Connection) -> None:
    [job] = await add_jobs(conn, ["192.0.2.9"])
    assert await conn.fetchval("select poller_alert_seq from jobs where id = $1", job) == -1
