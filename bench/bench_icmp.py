"""Benchmark: in-process ICMP against fping on the same 5,000 loopback targets, in one run.

1. The pinger alone: every target pinged `--rounds` times, 500 in flight, CPU seconds
   per 1,000 pings of this process, beside `fping -C1 -i0` over the same targets (its
   CPU from the kernel's child rusage). Ratio pinger / fping.
2. The whole poller pipeline (schedule → ping → record into Postgres): one poller process
   with PING_BACKEND=icmp over jobs at a 1 s cadence, at each --pipeline rate (2,000 and
   15,000 pings/s); CPU of the poller process per 1,000 pings, ratio against fping in a
   burst (its floor) and against fping paced at the same rate over as many targets
   (`-c N -p 1000 -i 1000/rate`: each target once a second, as the pipeline pings).
3. The most pings per second one poller process sustains with every slot recorded and
   p99 lateness under 10 ms: a ladder of job counts at a 1 s cadence.
Beside them, the CPU a bare wake-up from a 2 ms sleep costs on this machine: the floor
under the pipeline's cost per dispatch round (rounds are at least 2 ms apart).

Needs root (raw ICMP sockets) or ping sockets allowed, and `fping` on PATH.

    python bench/bench_icmp.py [--rounds 4] [--pipeline 2000 15000] [--ladder 15000 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_poller import measure  # noqa: E402

from poller.localpg import LocalPostgres  # noqa: E402
from poller.migrate import migrate  # noqa: E402
from poller.models import SampleStatus  # noqa: E402
from poller.pingers import PingResult  # noqa: E402
from poller.pingers.icmp import IcmpPinger  # noqa: E402


def _targets(n: int) -> list[str]:
    """The addresses `bench_poller.seed` gives n jobs."""
    return [f"127.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(1, n + 1)]


TARGETS = _targets(5000)


async def pinger_alone(rounds: int, window: int = 500) -> tuple[float, int, int]:
    """(CPU seconds, pings, successes) for every target pinged `rounds` times."""
    pinger = IcmpPinger(timeout_s=2.0)
    await pinger.start()
    todo = TARGETS * rounds
    done = asyncio.Event()
    state = {"next": 0, "out": 0, "ok": 0, "seen": 0}

    def on_result(result: PingResult) -> None:
        state["out"] -= 1
        state["seen"] += 1
        state["ok"] += result.status is SampleStatus.SUCCESS
        fill()
        if state["seen"] == len(todo):
            done.set()

    def fill() -> None:
        while state["out"] < window and state["next"] < len(todo):
            state["out"] += 1
            pinger.submit(todo[state["next"]], on_result)
            state["next"] += 1

    cpu0 = time.process_time()
    fill()
    await done.wait()
    cpu = time.process_time() - cpu0
    await pinger.close()
    return cpu, len(todo), state["ok"]


def wakeup_cpu_us(tick_s: float = 0.002, seconds: float = 3.0) -> float:
    """CPU microseconds this machine charges a process per wake-up from a short sleep (a
    bare loop of time.sleep(tick_s)): the floor under any paced pipeline's cost per
    dispatch round, whatever the pings cost. On a VM it is far above bare metal's."""
    cpu0, end, n = time.process_time(), time.monotonic() + seconds, 0
    while time.monotonic() < end:
        time.sleep(tick_s)
        n += 1
    return (time.process_time() - cpu0) / n * 1e6


def fping_cpu(rounds: int) -> tuple[float, int]:
    """(CPU seconds, pings) of fping over the same targets, `rounds` times."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(TARGETS))
        f.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(rounds):
            subprocess.run(["fping", "-C1", "-q", "-i0", "-t", "2000", "-f", f.name],
                           capture_output=True, check=False, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, len(TARGETS) * rounds


def fping_paced(rate: int, rounds: int) -> tuple[float, int, float, str]:
    """(CPU seconds, pings sent, wall seconds, fping's error or "") of fping pinging
    `rate` targets once a second each (`-p 1000`, sends `1000 / rate` ms apart) for
    `rounds` seconds: the pipeline's load at `rate`, paced as the pipeline is, where
    `fping_cpu` sends in a burst. fping then pays for its own wake-ups, as the pipeline
    does. (At 15,000 targets fping may stop: it keeps 65,536 sequence numbers for 10 s.)"""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(_targets(rate)))
        f.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        out = subprocess.run(["fping", "-q", "-c", str(rounds), "-p", "1000",
                              "-i", f"{1000 / rate:.4f}", "-f", f.name],
                             capture_output=True, text=True, check=False,
                             timeout=rounds * 20 + 60)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # With -q, one line per target: "<ip> : xmt/rcv/%loss = 10/10/0%, …"
    sent = sum(int(m) for m in re.findall(r"xmt/rcv/%loss = (\d+)/", out.stderr))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    error = "" if out.returncode in (0, 1) else (  # 1: some target did not answer
        out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
    return cpu, sent, wall, error


async def main(args: argparse.Namespace) -> None:
    if shutil.which("fping") is None:
        sys.exit("fping is not installed (Debian: apt-get install fping)")
    fcpu, fpings = fping_cpu(args.rounds)
    pcpu, ppings, ok = await pinger_alone(args.rounds)
    f1k, p1k = fcpu / fpings * 1000, pcpu / ppings * 1000
    print(f"fping:         {fpings:>7} pings  {f1k:.4f} CPU-s per 1k")
    print(f"pinger alone:  {ppings:>7} pings  {p1k:.4f} CPU-s per 1k  ({ok} answered)  "
          f"ratio {p1k / f1k:.2f}x fping")
    wake = wakeup_cpu_us()
    print(f"a wake-up from a 2 ms sleep costs {wake:.0f} us of CPU here: at 500 dispatch "
          f"rounds a second, {wake * 500 / 1000:.0f} ms of CPU per second before any ping")
    env = {"PING_BACKEND": "icmp", "PING_TIMEOUT_MS": "2000", "CONCURRENCY": "2000",
           "BATCH_SIZE": "1000", "DATABASE_PREPARED_STATEMENTS": "true"}
    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        for rate in args.pipeline:
            r = await measure(pg, rate, 1, env, args.window)
            print(f"pipeline at {rate}/s: {r.recorded:>7} pings  {r.cpu_per_1k:.4f} CPU-s per "
                  f"1k  (every slot recorded: {r.recorded == r.due}, p99 lateness "
                  f"{r.p99_ms:.1f} ms)  ratio {r.cpu_per_1k / f1k:.2f}x fping in a burst")
            cpu, sent, wall, error = fping_paced(rate, args.paced_rounds)
            if error or not sent:
                print(f"  fping paced at {rate}/s: did not run through ({error[:200]})")
                continue
            paced = cpu / sent * 1000
            print(f"  fping paced at {rate}/s: {sent:>7} pings in {wall:.1f}s (asked: "
                  f"{args.paced_rounds}s and its wait for the last replies)  {paced:.4f} CPU-s "
                  f"per 1k  pipeline ratio {r.cpu_per_1k / paced:.2f}x fping at the same rate",
                  flush=True)
        print("\nladder at 1 s cadence (pings/s = jobs):")
        print(f"{'jobs':>7} {'due':>7} {'recorded':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'CPU s/1k':>8}  held (p99 < 10 ms, all recorded)")
        best = 0
        for n in args.ladder:
            r = await measure(pg, n, 1, env, args.window)
            held = r.held_within(10)
            best = max(best, n) if held else best
            print(f"{n:>7} {r.due:>7} {r.recorded:>8} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} "
                  f"{r.cpu_per_1k:>8.4f}  {'yes' if held else 'NO'}", flush=True)
        print(f"\nmost pings/s held by one poller process: {best or 'none of the ladder'}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root; ping sockets must be allowed (net.ipv4.ping_group_range)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pipeline", type=int, nargs="+", default=[2000, 15000],
                        help="pings/s (jobs at a 1 s cadence) of the pipeline-vs-fping runs")
    parser.add_argument("--ladder", type=int, nargs="+", default=[15000, 20000, 30000])
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--paced-rounds", type=int, default=10,
                        help="seconds of paced fping at each --pipeline rate")
    asyncio.run(main(parser.parse_args()))
