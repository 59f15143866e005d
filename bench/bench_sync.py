"""Benchmark: what a sync costs, with the incremental sync and with full reads.

A throwaway real Postgres holding --jobs running real-polling jobs (60 s cadence), all
owned by one poller (REPLICA_COUNT=1). In this process, one poller service (not pinging)
syncs against it:
  - the first sync: a full read in pages, its wall time, the poller's CPU, and the event
    loop's lag meanwhile (a ticker that asks to wake every 5 ms: how late it woke, p99 and
    max), which is what a ping due during the read would be delayed by;
  - --quiet syncs with nothing changed: poller CPU and wall time per sync, the share of a
    core at POLL_INTERVAL_MS=5000, and the database time of the call;
  - the same syncs as full reads (the cursor dropped each time), for reference;
  - a sync after --edits jobs changed (inserted, cancelled, edited).

    python bench/bench_sync.py [--jobs 250000] [--quiet 20] [--edits 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.localpg import LocalPostgres, free_port  # noqa: E402
from poller.migrate import migrate  # noqa: E402
from poller.service import Service  # noqa: E402
from poller.settings import Settings  # noqa: E402

_SEED = """
insert into jobs (account_number, target_ip, reason, notification_email, requester_id,
                  requester_name, cadence_seconds, duration_minutes, monitoring_mode,
                  started_at)
select 'B-' || g, '127.' || (g / 65536 % 256) || '.' || (g / 256 % 256) || '.' || (g % 256),
       'proactive', 'b@example.com', gen_random_uuid(), 'bench', 60, 1440, 'real_polling',
       now() - (g % 60) * interval '1 second'
from generate_series(1, $1) g
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _lag_during(work: asyncio.Future[None] | asyncio.Task[None]) -> list[float]:
    """How late a 5 ms timer fires, over and over, while `work` runs (seconds)."""
    lags = []
    while not work.done():
        asked = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - asked - 0.005)
    await work
    return lags


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def main(jobs: int, quiet: int, edits: int) -> None:
    gc.set_threshold(100_000, 50, 100)  # as `python -m poller` does (poller/__main__.py)
    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        conn = await asyncpg.connect(pg.dsn)
        t0 = time.perf_counter()
        await conn.execute(_SEED, jobs)
        await conn.execute("analyze jobs")
        print(f"{jobs} jobs seeded in {time.perf_counter() - t0:.1f}s")
        settings = Settings.from_env({"DATABASE_URL": pg.dsn, "PORT": str(free_port()),
                                      "DB_TIMEOUT_MS": "120000"})
        svc = Service(settings)
        await svc.store.open()
        try:
            c0, t0 = _cpu(), time.perf_counter()
            lags = await _lag_during(asyncio.ensure_future(svc.sync_once()))
            full_wall, full_cpu = time.perf_counter() - t0, _cpu() - c0
            owned = len(svc.scheduler.jobs)
            print(f"first sync (full read, {owned} jobs): {full_wall:.2f}s wall, "
                  f"{full_cpu:.2f}s poller CPU; event loop lag meanwhile p99 "
                  f"{_pct(lags, 0.99) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms")

            async def timed(n: int, full: bool) -> tuple[float, float, float]:
                walls, cpus, db = [], [], []
                for _ in range(n):
                    if full:
                        svc.sync.resync()
                    c, t = _cpu(), time.perf_counter()
                    await svc.sync_once()
                    walls.append(time.perf_counter() - t)
                    cpus.append(_cpu() - c)
                    d = time.perf_counter()
                    buckets, cursor = svc.sync.position
                    await conn.fetchval("select poller_job_changes($1, $2::xid8, 25000)",
                                        list(buckets), cursor)
                    db.append(time.perf_counter() - d)
                return (statistics.median(walls), statistics.mean(cpus),
                        statistics.median(db))

            wall, cpu, db = await timed(quiet, full=False)
            print(f"quiet sync (nothing changed): {wall * 1000:.2f} ms wall, "
                  f"{cpu * 1000:.2f} ms poller CPU per sync = {cpu / 5 * 100:.3f} % of a "
                  f"core at POLL_INTERVAL_MS=5000; the call alone {db * 1000:.2f} ms")
            fwall, fcpu, _ = await timed(max(2, quiet // 5), full=True)
            print(f"reference, the same sync as a full read: {fwall * 1000:.0f} ms wall, "
                  f"{fcpu * 1000:.0f} ms poller CPU per sync = {fcpu / 5 * 100:.1f} % of a "
                  f"core; ratio incremental/full CPU {cpu / fcpu:.4f}")
            ids = [r["id"] for r in await conn.fetch(
                "select id from jobs order by id limit $1", edits)]
            third = max(1, edits // 3)
            await conn.execute("update jobs set status = 'cancelled' where id = any($1)",
                               ids[:third])
            await conn.execute("update jobs set cadence_seconds = 30 where id = any($1)",
                               ids[third:2 * third])
            await conn.execute(_SEED, edits - 2 * third)  # new jobs
            c, t = _cpu(), time.perf_counter()
            await svc.sync_once()
            print(f"a sync after {edits} changes: {(time.perf_counter() - t) * 1000:.1f} ms "
                  f"wall, {(_cpu() - c) * 1000:.2f} ms poller CPU; owned now "
                  f"{len(svc.scheduler.jobs)} (was {owned})")
        finally:
            await svc.store.close()
            await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=250_000)
    p.add_argument("--quiet", type=int, default=20)
    p.add_argument("--edits", type=int, default=100)
    a = p.parse_args()
    asyncio.run(main(a.jobs, a.quiet, a.edits))
