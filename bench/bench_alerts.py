"""Benchmark: what the alert evaluation costs on the write path.

A throwaway real Postgres with the migrations applied; two equal sets of running jobs at a
1 s cadence. Each round writes one sample per job for both sets, in batches of
--batch samples: set A through poller_record_batch (the write without alerts, kept for
pollers of earlier releases), set B through poller_record_samples (the same write plus
the alert evaluation and the outbox). Rounds alternate between the two so both see the
same table sizes. Statuses: mostly success, some misses and system errors, and a tenth
of the jobs going offline and recovering in turn, so transitions happen.

Printed per 1,000 samples: database time (wall time of the calls on a loopback
connection) and the backend's CPU time (from /proc), for both, and their ratio.

With --held N, each job's samples start at slot N: slots 0..N-1 have no sample and are
not settled (ALERT_SETTLE_S, 60 s), so every job is held behind a hole for the whole run,
as a replica's jobs are after a restart or a takeover.

    python bench/bench_alerts.py [--jobs 5000] [--rounds 30] [--batch 1000] [--held 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.localpg import LocalPostgres  # noqa: E402
from poller.migrate import migrate  # noqa: E402
from tests.support.db import add_jobs  # noqa: E402

_ARGS = "$1::uuid[], $2::int[], $3::text[], $4::float8[], $5::float8[], $6::timestamptz[]"
CALLS = {"without alerts": f"select poller_record_batch({_ARGS}, '{{}}')",
         "with alerts": f"select poller_record_samples({_ARGS}, '{{}}', 60)"}
TICKS = 100  # /proc/<pid>/stat clock ticks per second on Linux


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _status(job: int, k: int, rng: random.Random) -> str:
    if job % 10 == 0:  # flapping: 8 misses, 8 successes, … (an alert each way)
        return "missed" if (k // 8) % 2 == 0 else "success"
    r = rng.random()
    return "success" if r < 0.95 else "missed" if r < 0.99 else "system_error"


async def main(jobs: int, rounds: int, batch: int, held: int) -> None:
    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        setup = await asyncpg.connect(pg.dsn)
        started = datetime.now(UTC) - timedelta(seconds=1)
        sets = {}
        for name in CALLS:
            ids = await add_jobs(setup, ["192.0.2.1"] * jobs, started_at=started)
            sets[name] = ids
        await setup.close()
        conns = {name: await asyncpg.connect(pg.dsn) for name in CALLS}
        pids = {name: await c.fetchval("select pg_backend_pid()") for name, c in conns.items()}
        wall = dict.fromkeys(CALLS, 0.0)
        cpu = dict.fromkeys(CALLS, 0.0)
        rng = random.Random(1)
        for k in range(rounds):
            at = started + timedelta(seconds=held + k)
            for name, sql in (CALLS.items() if k % 2 == 0 else reversed(CALLS.items())):
                ids = sets[name]
                statuses = [_status(i, k, rng) for i in range(jobs)]
                for lo in range(0, jobs, batch):
                    part = range(lo, min(jobs, lo + batch))
                    args = ([ids[i] for i in part], [held + k] * len(part),
                            [statuses[i] for i in part],
                            [1.5 if statuses[i] == "success" else None for i in part],
                            [None] * len(part), [at] * len(part))
                    c0, t0 = _cpu_s(pids[name]), time.perf_counter()
                    await conns[name].fetchval(sql, *args)
                    wall[name] += time.perf_counter() - t0
                    cpu[name] += _cpu_s(pids[name]) - c0
        check = conns["with alerts"]
        alerts = await check.fetchval("select count(*) from alerts")
        for c in conns.values():
            await c.close()
    per_k = 1000 / (jobs * rounds)
    base, new = "without alerts", "with alerts"
    print(f"{jobs} jobs, {rounds} rounds, batches of {batch}"
          f"{f', held behind {held} missing slots' if held else ''}; {alerts} alerts raised")
    for name in CALLS:
        print(f"  {name:<15} database time {wall[name] * per_k * 1000:6.2f} ms, backend CPU "
              f"{cpu[name] * per_k * 1000:6.2f} ms per 1,000 samples")
    print(f"  ratio (with / without): time {wall[new] / wall[base]:.3f}, "
          f"CPU {cpu[new] / max(cpu[base], 1e-9):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--held", type=int, default=0,
                   help="missing, unsettled slots before each job's first sample")
    a = p.parse_args()
    asyncio.run(main(a.jobs, a.rounds, a.batch, a.held))
