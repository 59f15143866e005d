"""Test helpers for the Sound Check schema: create jobs the way the app does."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

_INSERT_JOB = """
insert into jobs (id, account_number, target_ip, target_mac, reason, notification_email,
                  requester_id, requester_name, source, cadence_seconds, duration_minutes,
                  status, monitoring_mode, started_at)
values ($1, 'ACC-1', $2, $3, 'proactive', 'noc@example.com', $4, 'Test Runner', 'test',
        $5, $6, 'running', $7, coalesce($8, now()))
"""


# The batch write, with every argument: job ids, sequence numbers, statuses, RTTs, jitters,
# times, jobs to complete, settle seconds.
RECORD_SAMPLES = ("select poller_record_samples($1::uuid[], $2::int[], $3::text[], "
                  "$4::float8[], $5::float8[], $6::timestamptz[], $7::uuid[], $8)")


async def add_jobs(
    conn: asyncpg.Connection,
    targets: Sequence[str | None],
    *,
    cadence_seconds: int | Sequence[int] = 1,
    duration_minutes: int = 60,
    started_at: datetime | None = None,
    mode: str = "real_polling",
    ids: Sequence[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """One running job per target (with the given ids, or new ones); a None target gets a
    MAC only (no IP), as the app allows."""
    made = []
    requester = uuid.uuid4()
    for i, target in enumerate(targets):
        job_id = ids[i] if ids is not None else uuid.uuid4()
        cadence = cadence_seconds if isinstance(cadence_seconds, int) else cadence_seconds[i]
        mac = "aa:bb:cc:dd:ee:ff" if target is None else None
        await conn.execute(_INSERT_JOB, job_id, target, mac, requester, cadence,
                           duration_minutes, mode, started_at)
        made.append(job_id)
    return made
