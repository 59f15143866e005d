"""Benchmark: poller_record_samples of one commit against another's, on the same data.

A throwaway real Postgres with every migration applied; both bodies are installed beside
each other under other names (rec_old, rec_new) and called in turn, in alternating order,
each with a batch of one new sample per running job. Printed: the median and mean wall time
per batch (loopback, so database time) for each, and their ratio.

A version is a git commit (the function as that commit defined it: in
poller/sql/repeatable/50_samples.sql, or, before that layout, in the last migration that
redefined it) or `worktree`, the checkout's own file. The default compares 0.1.0 with the
checkout (0.2.0 added the refusal of late samples).

    python bench/bench_record_versions.py [--old e8a885f] [--new worktree] [--jobs 1000] \
        [--rounds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
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

FILE = "poller/sql/repeatable/50_samples.sql"
DEFINITION = "create or replace function poller_record_samples("


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def source(version: str) -> str:
    """The SQL that defines poller_record_samples at `version`."""
    if version == "worktree":
        return (ROOT / FILE).read_text()
    files = _git("ls-tree", "-r", "--name-only", version, "poller/sql").split()
    if FILE in files:
        return _git("show", f"{version}:{FILE}")
    texts = [_git("show", f"{version}:{f}") for f in sorted(files) if f.endswith(".sql")]
    return [t for t in texts if DEFINITION in t][-1]


def body(version: str, name: str) -> str:
    text = source(version)
    start = text.index(DEFINITION)
    end = text.index("$$;", start) + 3
    return text[start:end].replace("function poller_record_samples(", f"function {name}(")


async def main(args: argparse.Namespace) -> None:
    with LocalPostgres() as pg:
        await migrate(pg.dsn)
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute(body(args.old, "rec_old"))
        await conn.execute(body(args.new, "rec_new"))
        jobs = await add_jobs(conn, [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(args.jobs)],
                              duration_minutes=600,
                              started_at=datetime.now(UTC) - timedelta(seconds=5))
        times: dict[str, list[float]] = {"rec_old": [], "rec_new": []}
        seq = 0
        for rnd in range(args.rounds):  # bounded
            for fn in ("rec_old", "rec_new") if rnd % 2 else ("rec_new", "rec_old"):
                n = len(jobs)
                start = time.perf_counter()
                await conn.fetchval(
                    f"select {fn}($1::uuid[], $2::int[], $3::text[], $4::float8[], "
                    "$5::float8[], $6::timestamptz[], '{}', 60)",
                    jobs, [seq] * n, ["success"] * n, [1.0] * n, [None] * n,
                    [datetime.now(UTC)] * n)
                times[fn].append(time.perf_counter() - start)
                seq += 1
        await conn.close()
    med = {fn: statistics.median(v) * 1000 for fn, v in times.items()}
    for fn, label in (("rec_old", args.old), ("rec_new", args.new)):
        print(f"{label}: median {med[fn]:.2f} ms, mean {statistics.mean(times[fn]) * 1000:.2f} "
              f"ms per batch of {args.jobs}")
    print(f"ratio {args.new}/{args.old}: {med['rec_new'] / med['rec_old']:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="e8a885f")
    parser.add_argument("--new", default="worktree")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=60)
    asyncio.run(main(parser.parse_args()))
