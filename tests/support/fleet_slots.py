"""Slots due and slots missed across a whole fleet's life: the running set of jobs, grown with
new jobs and shrunk by cancelling the newest, and the count of slots that fell due while a
pod was serving and have no sample (tests/test_fleet_e2e.py, tests/test_fleet_k8s.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from tests.support.db import add_jobs
from tests.support.fleet_runner import Counters

MARGIN_S = 1.0  # around pod start/stop and job start/cancel: what "while" means here


class Jobs:
    """The running set, grown with new jobs and shrunk by cancelling the newest."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.running: list[UUID] = []
        self.cancelled_at: dict[UUID, float] = {}
        self.made = 0

    async def set(self, n: int) -> None:
        if n > len(self.running):
            k = n - len(self.running)
            ips = [f"127.{(self.made + i) // 62500 % 250 + 1}.{(self.made + i) // 250 % 250}."
                   f"{(self.made + i) % 250 + 1}" for i in range(k)]
            self.running += await add_jobs(self.conn, ips,
                                           cadence_seconds=[1 + i % 2 for i in range(k)])
            self.made += k
        elif n < len(self.running):
            gone, self.running = self.running[n:], self.running[:n]
            await self.conn.execute(
                "update jobs set status = 'cancelled' where id = any($1::uuid[])", gone)
            now = time.time()
            self.cancelled_at.update(dict.fromkeys(gone, now))


@dataclass
class Missed:
    served: int  # slots due while the job ran and a pod was serving
    served_missing: int
    due: int  # slots due while the job ran, pods or not
    due_missing: int
    missing_at: list[float]  # due times of every missed slot

    def missed_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.missing_at)


async def missed_slots(conn: asyncpg.Connection, jobs: Jobs, counters: Counters,
                       end: float) -> Missed:
    rows = await conn.fetch(
        """select j.id, extract(epoch from j.started_at)::float8 as started, j.cadence_seconds,
                  coalesce(array_agg(s.sequence_number) filter (where s.id is not null), '{}')
                  as seqs
           from jobs j left join samples s on s.job_id = j.id group by j.id""")
    out = Missed(0, 0, 0, 0, [])
    for r in rows:
        stop = jobs.cancelled_at.get(r["id"], end)
        have = set(r["seqs"])
        k = math.ceil(MARGIN_S / r["cadence_seconds"])  # slots due MARGIN_S after the start
        while (due := r["started"] + k * r["cadence_seconds"]) < stop - MARGIN_S:
            out.due += 1
            if k not in have:
                out.due_missing += 1
                out.missing_at.append(due)
            if counters.serving_at(due, MARGIN_S):
                out.served += 1
                out.served_missing += k not in have
            k += 1
    return out
