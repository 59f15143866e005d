"""Benchmark: how many 10-second jobs one poller process holds, and what it costs.

One `python -m poller` process, the scripted latency stand-in (answering at once) in a
process of its own, a throwaway real Postgres. For each job count it runs a measured
window and prints:
  - slots due in the window and how many have a sample (all must),
  - lateness p50/p99/max (recorded_at - due; recorded_at is when the ping started),
  - poller CPU seconds per 1,000 pings (utime+stime from /proc),
  - database round trips per 1,000 samples, counted by a TCP proxy in front of Postgres
    (a round trip = the client speaking again after the server answered).
A reference run at the original's BATCH_SIZE=100 is printed beside BATCH_SIZE=1000.

    python bench/bench_poller.py                       # default ladder
    python bench/bench_poller.py --jobs 5000 20000 --window 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.localpg import LocalPostgres, free_port  # noqa: E402
from poller.migrate import migrate  # noqa: E402
from tests.support.tcp_proxy import RoundTripProxy  # noqa: E402

CADENCE = 10
TICKS = os.sysconf("SC_CLK_TCK")

# Slots k (0 ≤ k < slot count) of every job with started_at + k·cadence in [$1, $2], counted
# per job by arithmetic: a generate_series over every slot is a billion rows at 1M jobs.
DUE_SQL = """
select coalesce(sum(greatest(0,
           least(ceil(j.duration_minutes * 60.0 / j.cadence_seconds) - 1,
                 floor(($2::float8 - extract(epoch from j.started_at)::float8)
                       / j.cadence_seconds))
           - greatest(0, ceil(($1::float8 - extract(epoch from j.started_at)::float8)
                              / j.cadence_seconds)) + 1)), 0)::bigint
from jobs j where j.cadence_seconds >= 1 and j.duration_minutes >= 1
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Result:
    jobs: int
    batch_size: int
    due: int
    recorded: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_per_1k: float
    standin_cpu_per_1k: float
    round_trips_per_1k: float

    @property
    def held(self) -> bool:
        return self.held_within(50)

    def held_within(self, p99_ms: float) -> bool:
        return self.recorded == self.due and self.p99_ms < p99_ms


async def seed(dsn: str, n: int, cadence: int = CADENCE) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("truncate samples, sample_rollups, jobs cascade")
        # Phases spread over one cadence, as jobs started by people through the day are.
        await conn.execute(
            """insert into jobs (account_number, target_ip, reason, notification_email,
                                 requester_id, requester_name, source, cadence_seconds,
                                 duration_minutes, monitoring_mode, started_at, last_ping_at)
               select 'BENCH', '127.' || (i / 65536 % 256) || '.' || (i / 256 % 256) || '.'
                               || (i % 256),
                      'proactive', 'bench@example.com', gen_random_uuid(), 'bench', 'bench',
                      $2::int, 60, 'real_polling',
                      now() - make_interval(secs => $2::int * (i::float8 / $1::int)),
                      now() - interval '1 second'
               from generate_series(1, $1) as i""", n, cadence)
    finally:
        await conn.close()


async def run_one(pg: LocalPostgres, standin_url: str, standin_pid: int, n: int,
                  batch_size: int, window: float, prepared: bool) -> Result:
    env = {"LATENCY_API_URL": standin_url, "BATCH_SIZE": str(batch_size), "CONCURRENCY": "200",
           "DATABASE_PREPARED_STATEMENTS": "true" if prepared else "false"}
    return await measure(pg, n, CADENCE, env, window, standin_pid)


async def measure(pg: LocalPostgres, n: int, cadence: int, extra_env: dict[str, str],
                  window: float, standin_pid: int | None = None) -> Result:
    """One poller process over n jobs at `cadence`; figures for a `window` of seconds."""
    await seed(pg.dsn, n, cadence)
    proxy = RoundTripProxy(pg.port)
    await proxy.start()
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(free_port()),
           "LOG_LEVEL": "WARNING", **extra_env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "poller", env=env)
    try:
        # Warm-up: one sync interval and a cadence, so start-up catch-up is not measured.
        await asyncio.sleep(cadence + 6)
        other = cpu_seconds(standin_pid) if standin_pid else 0.0
        t0, cpu0, scpu0, rt0 = time.time(), cpu_seconds(proc.pid), other, proxy.round_trips
        await asyncio.sleep(window)
        other = cpu_seconds(standin_pid) if standin_pid else 0.0
        t1, cpu1, scpu1 = time.time(), cpu_seconds(proc.pid), other
        # Let the window's samples reach the database before counting round trips.
        await asyncio.sleep(4)
        rt1 = proxy.round_trips
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proxy.stop()
    conn = await asyncpg.connect(pg.dsn)
    try:
        due = await conn.fetchval(DUE_SQL, t0, t1)
        lateness = [r[0] for r in await conn.fetch(
            """select (extract(epoch from s.recorded_at) - extract(epoch from j.started_at)
                       - s.sequence_number * j.cadence_seconds) * 1000
               from samples s join jobs j on j.id = s.job_id
               where extract(epoch from j.started_at) + s.sequence_number * j.cadence_seconds
                     between $1 and $2""", t0, t1)]
    finally:
        await conn.close()
    lateness.sort()
    pings = len(lateness)
    q = statistics.quantiles(lateness, n=100) if pings > 1 else [0.0] * 99
    return Result(
        jobs=n, batch_size=int(extra_env.get("BATCH_SIZE", "100")), due=due, recorded=pings,
        p50_ms=q[49], p99_ms=q[98], max_ms=lateness[-1] if lateness else 0.0,
        cpu_per_1k=(cpu1 - cpu0) / max(pings, 1) * 1000,
        standin_cpu_per_1k=(scpu1 - scpu0) / max(pings, 1) * 1000,
        round_trips_per_1k=(rt1 - rt0) / max(pings, 1) * 1000,
    )


async def main(args: argparse.Namespace) -> None:
    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        port = free_port()
        standin = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.latency_standin", "--port", str(port),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        assert standin.stdout is not None
        url = json.loads(await standin.stdout.readline())["url"]
        try:
            print(f"{'jobs':>7} {'batch':>5} {'due':>7} {'recorded':>8} {'p50 ms':>7} "
                  f"{'p99 ms':>7} {'max ms':>7} {'CPU s/1k':>8} {'stand-in':>8} "
                  f"{'RT/1k':>6}  held")
            results = []
            runs = [(n, 1000) for n in args.jobs] + [(args.jobs[0], 100)]
            for n, batch in runs:
                r = await run_one(pg, url, standin.pid, n, batch, args.window,
                                  args.prepared_statements)
                results.append(r)
                print(f"{r.jobs:>7} {r.batch_size:>5} {r.due:>7} {r.recorded:>8} "
                      f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.1f} "
                      f"{r.cpu_per_1k:>8.3f} {r.standin_cpu_per_1k:>8.3f} "
                      f"{r.round_trips_per_1k:>6.2f}  {'yes' if r.held else 'NO'}", flush=True)
            held = [r.jobs for r in results if r.held and r.batch_size == 1000]
            print(f"\nlargest job count held at {CADENCE}s cadence (every slot recorded, "
                  f"p99 lateness < 50 ms): {max(held) if held else 'none'}")
            ref = results[-1]
            same = next(r for r in results if r.jobs == ref.jobs and r.batch_size == 1000)
            print(f"round trips per 1k samples at BATCH_SIZE=1000 vs 100 (same jobs): "
                  f"{same.round_trips_per_1k:.2f} vs {ref.round_trips_per_1k:.2f} "
                  f"(ratio {same.round_trips_per_1k / max(ref.round_trips_per_1k, 1e-9):.2f})")
        finally:
            standin.terminate()
            await standin.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[2000, 10000, 20000, 30000])
    parser.add_argument("--window", type=float, default=20.0,
                        help="measured seconds per run")
    parser.add_argument("--prepared-statements", action="store_true",
                        help="run the poller with DATABASE_PREPARED_STATEMENTS=true")
    asyncio.run(main(parser.parse_args()))
