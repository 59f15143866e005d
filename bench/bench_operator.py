"""Benchmark: how fast the fleet follows the load, and what a quiet fleet costs the API.

kmock as the Kubernetes API (with the gaps tests/support/kube_api.py fills), the operator
(kopf in its thread, the fleet's syncIntervalSeconds as given),
a throwaway Postgres. Prints:
- per step change of running jobs: seconds until the StatefulSet's spec.replicas changed
  (pods are played by tests.support.kube_api.FakePods: ready at once, syncing the topology);
- over a quiet stretch: API requests per sync, and how many of them were writes.

    python bench/bench_operator.py [--steps 5] [--sync 1] [--quiet 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def main(args: argparse.Namespace) -> None:
    import asyncpg

    from poller.localpg import LocalPostgres
    from poller.migrate import migrate
    from tests.support.db import add_jobs
    from tests.support.kube_api import NS, FakePods, running_operator

    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        os.environ["DATABASE_URL"] = pg.dsn
        conn = await asyncpg.connect(pg.dsn)
        async with running_operator(pg.dsn) as cluster:
            await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets", {
                "apiVersion": "soundcheck.io/v1alpha1", "kind": "PollerFleet",
                "metadata": {"name": "bench"},
                "spec": {"image": "img:1", "latencySidecar": True, "jobsPerReplica": 10,
                         "minReplicas": 0, "maxReplicas": 100,
                         "scaleDownStabilizationSeconds": 0,
                         "syncIntervalSeconds": args.sync,
                         "database": {"secretName": "soundcheck-db",
                                      "databaseUrlKey": "database-url"}}})
            pods_conn = await asyncpg.connect(pg.dsn)
            pods = asyncio.create_task(FakePods(cluster, pods_conn, "bench").run())
            await cluster.until(lambda: cluster.fleet_status("bench").get("runningJobs") == 0)
            lags = []
            for step in range(1, args.steps + 1):
                # A long cadence: no job turns stale (nothing pings them here) in the window.
                ids = await add_jobs(conn, [f"127.0.0.{i % 250 + 1}" for i in range(10)],
                                     cadence_seconds=3600)
                changed = time.monotonic()

                def reached(want: int = step) -> bool:
                    return cluster.replicas("bench") == want

                await cluster.until(reached, timeout=60)
                lags.append(time.monotonic() - changed)
                print(f"step {step}: {10 * step} running jobs → {step} replicas in "
                      f"{lags[-1]:.2f} s", flush=True)
                del ids
            await cluster.until(lambda: cluster.fleet_status("bench").get("desiredReplicas")
                                == args.steps and len(cluster.events("Scaled")) == args.steps
                                and cluster.fleet_status("bench").get("topology")
                                == str(args.steps))  # the last handover is complete
            # Let one full sync pass after the last change before counting.
            sts_reads = sum(1 for _, p in cluster.requests if p.endswith("/statefulsets/bench"))
            await cluster.until(lambda: sum(1 for _, p in cluster.requests
                                            if p.endswith("/statefulsets/bench")) >= sts_reads + 2)
            # A quiet stretch: nothing changes; count what the operator asks of the API.
            before = len(cluster.requests)
            status_before = cluster.fleet_status("bench")
            start = time.monotonic()
            await asyncio.sleep(args.quiet)
            status_after = cluster.fleet_status("bench")
            fields = {k: (status_before.get(k), v) for k, v in status_after.items()
                       if status_before.get(k) != v}
            quiet = cluster.requests[before:]
            syncs = (time.monotonic() - start) / args.sync
            writes = [r for r in quiet if r[0] in ("POST", "PATCH", "PUT", "DELETE")]
            print(f"\nstep → replicas: median {statistics.median(lags):.2f} s, "
                  f"max {max(lags):.2f} s (sync interval {args.sync} s)")
            print(f"quiet fleet: {len(quiet)} API requests in {args.quiet:.0f} s "
                  f"≈ {len(quiet) / syncs:.2f} per sync, writes: {len(writes)}, "
                  f"status fields changed: {fields or 'none'}")
            for method, path in sorted(set(quiet)):
                print(f"  {method} {path}")
            pods.cancel()
            await asyncio.gather(pods, return_exceptions=True)
            await pods_conn.close()
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sync", type=int, default=1)
    parser.add_argument("--quiet", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
