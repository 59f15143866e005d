"""Benchmark: how long a fleet's jobs go unpinged when a poller is lost, against the
fleet's failover timeout (the operator's `failoverTimeoutSeconds`, which it publishes).

Real `python -m poller` processes in one fleet (FLEET_NAME), the scripted latency stand-in
in this process, a throwaway Postgres. For each failover timeout: start the fleet, let it
settle, kill -9 one poller, and measure from the kill to the first ping of each of its jobs
by another poller (the ping's own time, `recorded_at`). Prints, per timeout: the median and
the longest gap, and their ratio to the timeout (sync interval and timeout bound it).

    python bench/bench_failover.py [--pollers 4] [--jobs 200] [--timeouts 2 5 10] [--sync 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.localpg import LocalPostgres  # noqa: E402
from poller.migrate import migrate  # noqa: E402
from poller.partition import owns  # noqa: E402
from tests.support.db import add_jobs  # noqa: E402
from tests.support.latency_standin import LatencyStandIn  # noqa: E402
from tests.support.processes import PollerProcess  # noqa: E402

FLEET = "bench/failover"


async def one_run(pg: LocalPostgres, standin: LatencyStandIn, pollers: int, jobs: int,
                  timeout_s: int, sync_s: float) -> list[float]:
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute("truncate jobs cascade; delete from poller_heartbeats; "
                           "delete from poller_topology")
        ids = await add_jobs(conn, [f"127.0.{i // 250 + 20}.{i % 250 + 1}"
                                    for i in range(jobs)], cadence_seconds=1)
        await conn.fetchval("select poller_publish_topology($1, $2)", FLEET, [pollers])
        await conn.execute("select poller_set_failover($1, $2)", FLEET, timeout_s)
        env = {"DATABASE_URL": pg.dsn, "LATENCY_API_URL": standin.url, "FLEET_NAME": FLEET,
               "POLL_INTERVAL_MS": str(int(sync_s * 1000)), "BATCH_FLUSH_INTERVAL_MS": "200",
               "LOG_LEVEL": "WARNING"}
        procs = [PollerProcess({**env, "HOSTNAME": f"fo-{i}"}) for i in range(pollers)]
        try:
            for p in procs:
                await p.start()
            await asyncio.sleep(3)  # settled: every replica synced a few times
            victim = procs[1]
            assert victim.proc is not None
            killed = time.time()
            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()
            await asyncio.sleep(timeout_s + 3 * sync_s + 2)
        finally:
            for p in procs:
                await p.kill()
        mine = [i for i in ids if owns(i, 1, [pollers])]
        rows = await conn.fetch(
            "select job_id, min(extract(epoch from recorded_at)::float8) as first "
            "from samples where job_id = any($1::uuid[]) "
            "and recorded_at > to_timestamp($2) group by job_id", mine, killed)
        return [r["first"] - killed for r in rows] + [float("inf")] * (len(mine) - len(rows))
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    standin = LatencyStandIn()
    await standin.start()
    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        print(f"{'timeout s':>9} {'jobs':>5} {'median gap s':>13} {'longest gap s':>14} "
              f"{'longest/timeout':>16}")
        for timeout_s in args.timeouts:
            gaps = await one_run(pg, standin, args.pollers, args.jobs, timeout_s, args.sync)
            print(f"{timeout_s:>9} {len(gaps):>5} {statistics.median(gaps):>13.2f} "
                  f"{max(gaps):>14.2f} {max(gaps) / timeout_s:>16.2f}")
    await standin.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeouts", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--sync", type=float, default=0.5, help="POLL_INTERVAL_MS, in s")
    asyncio.run(main(parser.parse_args()))
