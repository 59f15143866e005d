"""Benchmark: one migration's poller_record_samples against another's, on the same data.

A throwaway real Postgres with every migration applied; both bodies are installed beside
each other under other names (rec_old, rec_new) and called in turn, in alternating order,
each with a batch of one new sample per running job. Printed: the median and mean wall time
per batch (loopback, so database time) for each, and their ratio.

    python bench/bench_record_versions.py [--old 013] [--new 017] [--jobs 1000] [--rounds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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


def body(version: str, name: str) -> str:
    (path,) = (ROOT / "poller" / "sql").glob(f"{version}_*.sql")
    text = path.read_text()
    start = text.index("create or replace function poller_record_samples(")
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
    parser.add_argument("--old", default="013")
    parser.add_argument("--new", default="017")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=60)
    asyncio.run(main(parser.parse_args()))
