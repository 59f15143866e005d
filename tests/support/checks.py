"""Assertions on what the database holds after poller runs: every due slot, exactly once."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from uuid import UUID

import asyncpg


@dataclass
class JobSamples:
    id: UUID
    target_ip: str
    started_at: float
    cadence: int
    seqs: list[int]
    recorded_at: list[float]


async def load(conn: asyncpg.Connection, job_ids: list[UUID]) -> list[JobSamples]:
    rows = await conn.fetch(
        """select j.id, j.target_ip, extract(epoch from j.started_at)::float8 as started,
                  j.cadence_seconds,
                  coalesce(array_agg(s.sequence_number order by s.sequence_number)
                           filter (where s.id is not null), '{}') as seqs,
                  coalesce(array_agg(extract(epoch from s.recorded_at)::float8
                                     order by s.sequence_number)
                           filter (where s.id is not null), '{}') as ts
           from jobs j left join samples s on s.job_id = j.id
           where j.id = any($1::uuid[]) group by j.id""", job_ids)
    return [JobSamples(r["id"], r["target_ip"], r["started"], r["cadence_seconds"],
                       list(r["seqs"]), list(r["ts"])) for r in rows]


def due_between(job: JobSamples, start: float, end: float) -> set[int]:
    """Slots k with start <= due(k) <= end."""
    first = max(0, math.ceil((start - job.started_at) / job.cadence))
    last = math.floor((end - job.started_at) / job.cadence)
    return set(range(first, last + 1))


def assert_every_slot_once(jobs: list[JobSamples], requests: Counter[str], *,
                           must_start: float, must_end: float, may_end: float) -> int:
    """Every slot due in [must_start, must_end] has a sample; none due after may_end; each
    sample's ping was made once (the latency API saw as many requests as there are rows)
    and recorded_at is when the ping was made. Returns the number of samples checked."""
    total = 0
    for job in jobs:
        assert len(job.seqs) == len(set(job.seqs)), f"duplicate rows for {job.id}"
        missing = due_between(job, must_start, must_end) - set(job.seqs)
        assert not missing, f"job {job.id}: no sample for due slots {sorted(missing)}"
        late = [k for k in job.seqs if job.started_at + k * job.cadence > may_end]
        assert not late, f"job {job.id}: pinged slots {late} due after the stop"
        assert requests[job.target_ip] == len(job.seqs), (
            f"job {job.id}: {requests[job.target_ip]} pings for {len(job.seqs)} samples")
        for k, ts in zip(job.seqs, job.recorded_at, strict=True):
            due = job.started_at + k * job.cadence
            # Slot 0 may be pinged late (first sight); any other within its cadence.
            assert due - 0.05 <= ts <= due + (job.cadence if k else 30), (job.id, k, ts - due)
        total += len(job.seqs)
    return total
