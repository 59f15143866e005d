"""Benchmark: a fleet of pollers on one machine at a given number of running jobs.

A throwaway real Postgres holding --jobs running real-polling jobs at a 60 s cadence (their
phases spread over the minute, targets in 127.0.0.0/8), --pollers poller processes in one
fleet (topology published as the operator would), pinging with in-process ICMP. After
the first complete cadence (see below), it measures a --window of seconds and prints:
  - slots due in the window and how many have a sample (all should), lateness p50/p99/max;
  - samples dropped (the pollers' own counter);
  - time from start to every poller's first sync, and to the first complete cadence
    (synced, one cadence later, and what the start's catch-up buffered written);
  - CPU per 1,000 pings of the pollers and of Postgres, separately (from /proc);
  - poller RSS per owned job;
  - the database time of a quiet fleet sync (nothing changed) and of the operator's
    fleet-state query at this size.

    python bench/bench_fleet_scale.py --jobs 20000 --pollers 2 --window 30   # CI-sized
    python bench/bench_fleet_scale.py --jobs 1000000 --pollers 2 --window 60   # README

Needs root (or ping sockets allowed) for ICMP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_poller import DUE_SQL, TICKS, cpu_seconds  # noqa: E402

from poller.localpg import LocalPostgres, free_port  # noqa: E402
from poller.migrate import migrate  # noqa: E402

CADENCE = 60
FLEET = "bench/scale"

_SEED = """
insert into jobs (account_number, target_ip, reason, notification_email, requester_id,
                  requester_name, source, cadence_seconds, duration_minutes, monitoring_mode,
                  started_at, last_ping_at)
select 'SCALE', '127.' || (1 + i / 65536 % 250) || '.' || (i / 256 % 256) || '.' || (i % 256),
       'proactive', 'scale@example.com', gen_random_uuid(), 'bench', 'bench', $2::int, 1440,
       'real_polling', now() - make_interval(secs => $2::int * (i::float8 / $1::int)),
       now() - interval '1 second'
from generate_series(0, $1 - 1) as i
"""


def server_cpu(pg: LocalPostgres) -> float:
    """CPU seconds of the whole server: the postmaster, its live children, and what its
    children that ended had used."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / TICKS
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[1]) == postmaster:
            total += (int(f[11]) + int(f[12])) / TICKS
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _best_ms(conn: asyncpg.Connection, sql: str, *args: object, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await conn.fetchval(sql, *args)
        times.append(time.perf_counter() - t)
    return min(times) * 1000


async def main(jobs: int, pollers: int, window: float, cadence: int,
               shared_buffers: str, logs: str | None) -> None:
    # Sized as a database for this many jobs would be (a quarter of the memory is the usual
    # sizing): with the default 128 MB, the samples indexes and the jobs table no longer
    # fit, and Postgres's CPU per sample rose by about a fifth at 250,000 jobs.
    with LocalPostgres(settings={"shared_buffers": shared_buffers}) as pg:
        await migrate(pg.dsn)
        conn = await asyncpg.connect(pg.dsn, command_timeout=600)
        t = time.perf_counter()
        await conn.execute(_SEED, jobs, cadence)
        await conn.execute("analyze")
        print(f"{jobs} jobs seeded in {time.perf_counter() - t:.0f}s; {pollers} pollers")
        await conn.fetchval("select poller_publish_topology($1, $2::int[])", FLEET, [pollers])
        env = {**os.environ, "DATABASE_URL": pg.dsn, "FLEET_NAME": FLEET,
               "PING_BACKEND": "icmp", "BATCH_SIZE": "1000", "CONCURRENCY": "2000",
               "PING_TIMEOUT_MS": "2000", "LOG_LEVEL": "INFO", "DB_TIMEOUT_MS": "60000",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        started = time.time()
        procs = []
        ports = [free_port() for _ in range(pollers)]
        for i in range(pollers):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "poller",
                env={**env, "HOSTNAME": f"scale-{i}", "PORT": str(ports[i])},
                stderr=asyncio.subprocess.PIPE))
        try:
            keep = [Path(logs) / f"poller-{i}.log" if logs else None for i in range(pollers)]
            synced = await asyncio.gather(*(_first_sync(p, k) for p, k in zip(procs, keep,
                                                                                strict=True)))
            drains = [asyncio.create_task(_drain(p.stderr, k))
                      for p, k in zip(procs, keep, strict=True) if p.stderr]
            all_synced = max(synced)
            print(f"every poller synced {all_synced - started:.1f}s after start", flush=True)
            await asyncio.sleep(max(0.0, all_synced + cadence - time.time()))
            # The start (full reads while every poller pings) may leave samples buffered:
            # the window starts once they are written, and the time to that is the time to
            # the first complete cadence.
            for _ in range(600):  # bounded: ten minutes
                buffered = [await _counter(port, "soundcheck_poller_buffered_samples")
                            for port in ports]
                if max(buffered) < 2000:
                    break
                await asyncio.sleep(1)
            print(f"first complete cadence (synced, a cadence on, the backlog written) "
                  f"{time.time() - started:.0f}s after start", flush=True)
            dropped0 = sum([await _counter(port, "soundcheck_poller_samples_dropped_total")
                            for port in ports])
            t0 = time.time()
            p0 = sum(cpu_seconds(p.pid) for p in procs)
            s0 = server_cpu(pg)
            await asyncio.sleep(window)
            t1 = time.time()
            p1 = sum(cpu_seconds(p.pid) for p in procs)
            s1 = server_cpu(pg)
            rss = sum(rss_bytes(p.pid) for p in procs)
            await asyncio.sleep(5)  # the window's last batches reach the database
            quiet = json.loads(await conn.fetchval(
                "select poller_fleet_sync_delta($1, 0, 0, $2::int[], now(), false, 0, "
                "'bench', 5000, null, '{}')", FLEET, [pollers]))
            sync_ms = await _best_ms(
                conn, "select poller_fleet_sync_delta($1, 0, 0, $2::int[], now(), false, 0, "
                "'bench', 5000, $3::xid8, $4::int[])", FLEET, [pollers],
                int(quiet["cursor"]), quiet["buckets"])
            state_ms = await _best_ms(conn, "select poller_fleet_state($1)", FLEET, n=3)
            dropped = sum([await _counter(port, "soundcheck_poller_samples_dropped_total")
                           for port in ports]) - dropped0
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(p.wait(), 120) for p in procs]
            await asyncio.gather(*drains)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
        due = await conn.fetchval(DUE_SQL, t0, t1)
        late = sorted(r[0] for r in await conn.fetch(
            """select (extract(epoch from s.recorded_at) - extract(epoch from j.started_at)
                       - s.sequence_number * j.cadence_seconds) * 1000
               from samples s join jobs j on j.id = s.job_id
               where extract(epoch from j.started_at) + s.sequence_number * j.cadence_seconds
                     between $1 and $2""", t0, t1))
        await conn.close()
    pings = len(late)
    q = statistics.quantiles(late, n=100) if pings > 1 else [0.0] * 99
    print(f"window {window:.0f}s: {due} slots due, {pings} recorded; lateness p50 "
          f"{q[49]:.1f} ms, p99 {q[98]:.1f} ms, max {late[-1] if late else 0:.0f} ms; "
          f"{pings / window:.0f} pings/s")
    print(f"CPU per 1,000 pings: pollers {(p1 - p0) / max(pings, 1) * 1000:.3f} s, "
          f"Postgres {(s1 - s0) / max(pings, 1) * 1000:.3f} s")
    print(f"poller RSS {rss / 2**20:.0f} MiB in all: {rss / jobs:.0f} bytes per owned job")
    print(f"database time: a quiet fleet sync {sync_ms:.1f} ms, the operator's fleet state "
          f"{state_ms:.0f} ms")
    print(f"samples dropped from the window on (buffer full, the pollers' counter): "
          f"{dropped:.0f}; exit codes "
          f"{codes} (0: what was buffered at the stop was written)")


async def _counter(port: int, name: str) -> float:
    """One value from a poller's /metrics."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def _first_sync(proc: asyncio.subprocess.Process, keep: Path | None) -> float:
    """When the poller logged its first good sync; its log is drained afterwards."""
    assert proc.stderr is not None
    with keep.open("wb") if keep else contextlib.nullcontext() as out:
        async with asyncio.timeout(600):
            while line := await proc.stderr.readline():
                if out:
                    out.write(line)
                if b" synced: " in line:
                    return time.time()
    raise RuntimeError("a poller ended before its first sync")


async def _drain(stream: asyncio.StreamReader, keep: Path | None) -> None:
    with keep.open("ab") if keep else contextlib.nullcontext() as out:
        while line := await stream.readline():
            if out:
                out.write(line)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--pollers", type=int, default=2)
    p.add_argument("--window", type=float, default=30.0)
    p.add_argument("--cadence", type=int, default=CADENCE,
                   help="seconds; a shorter one gives a million jobs' ping rate with fewer")
    p.add_argument("--shared-buffers", default="2GB", help="the benchmark Postgres's")
    p.add_argument("--logs", help="a folder to keep each poller's log in")
    a = p.parse_args()
    asyncio.run(main(a.jobs, a.pollers, a.window, a.cadence, a.shared_buffers, a.logs))
