"""A completed job stays consistent (poller_record_samples; docs/alerts-and-notices.md,
"Late samples"): its samples are the ones its rollups and completion notice were made
from, whatever arrives after.

Late samples (a frozen pod writing its buffer when it thaws) and replayed ones (a batch
written twice) are sent after the completion, and a batch is raced against the completing
one: each refused late sample is counted, and the rollups, the sample rows and the
notice's summary agree.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg

from poller.models import RecordResult
from tests.support.db import RECORD_SAMPLES, add_jobs
from tests.support.waiting import eventually

STARTED = datetime.now(UTC) - timedelta(minutes=5)  # a 1-minute job: over


async def _record(conn: asyncpg.Connection, job: UUID, seqs: list[int],
                  complete: bool = False) -> RecordResult:
    raw = await conn.fetchval(
        RECORD_SAMPLES, [job] * len(seqs), seqs, ["success"] * len(seqs),
        [1.0] * len(seqs), [None] * len(seqs),
        [STARTED + timedelta(seconds=k) for k in seqs], [job] if complete else [], 60)
    return RecordResult.from_json(json.loads(raw))


async def _figures(conn: asyncpg.Connection, job: UUID) -> tuple[int, int, int]:
    """Sample rows, the samples the rollups count, the notice summary's total."""
    rows = await conn.fetchval("select count(*) from samples where job_id = $1", job)
    rolled = await conn.fetchval(
        "select coalesce(sum(sample_count), 0) from sample_rollups where job_id = $1", job)
    summary = json.loads(await conn.fetchval("select soundcheck_job_summary($1)", job))
    return rows, rolled, summary["total"]


async def test_late_and_replayed_samples_leave_a_completed_job_as_it_was(
        conn: asyncpg.Connection) -> None:
    [job] = await add_jobs(conn, ["192.0.2.7"], duration_minutes=1, started_at=STARTED)
    done = await _record(conn, job, list(range(25)), complete=True)
    assert done.completed == (job,) and done.inserted == 25 and done.late == 0
    assert await _figures(conn, job) == (25, 25, 25)
    # After the completion: three slots never written (late), two replays of written ones.
    after = await _record(conn, job, [25, 26, 40, 3, 24])
    assert (after.inserted, after.late) == (0, 3)  # replays are duplicates, not late
    assert await _figures(conn, job) == (25, 25, 25)
    # The same late batch again: refused again, counted again.
    assert (await _record(conn, job, [25, 26, 40])).late == 3
    assert await conn.fetchval("select count(*) from poller_outbox where job_id = $1 "
                               "and kind = 'completion'", job) == 1


async def test_a_batch_racing_the_completion_takes_its_rows_out_again(
        conn: asyncpg.Connection, dsn: str) -> None:
    """The completing batch holds the job's row; a batch that inserted meanwhile (the job
    was running in its snapshot) waits for the row, then sees the job completed."""
    [job] = await add_jobs(conn, ["192.0.2.8"], duration_minutes=1, started_at=STARTED)
    await _record(conn, job, list(range(10)))
    completer = await asyncpg.connect(dsn)
    racer = await asyncpg.connect(dsn)
    try:
        tx = completer.transaction()
        await tx.start()
        done = await _record(completer, job, [10, 11], complete=True)
        assert done.completed == (job,)
        # Slot 12 from another replica: inserted (the job runs in its snapshot), then its
        # UPDATE of the job's row waits for the completer.
        racing = asyncio.create_task(_record(racer, job, [12, 5]))

        async def racer_waits() -> bool:
            return bool(await conn.fetchval(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                "and pid = $1", racer.get_server_pid()))

        await eventually(racer_waits, timeout=10, interval=0.01,
                         what="the racing batch waiting for the completer")
        await tx.commit()
        raced = await asyncio.wait_for(racing, 30)
    finally:
        await completer.close()
        await racer.close()
    assert (raced.inserted, raced.late) == (0, 1)  # 12 taken out again; 5 a duplicate
    assert await _figures(conn, job) == (12, 12, 12)
    assert await conn.fetchval("select count(*) from samples where job_id = $1 "
                               "and sequence_number = 12", job) == 0
