"""Benchmark: samples per second recorded through each transport, in one run.

The same batches go through `PostgresStore` (asyncpg, direct) and `SupabaseStore`
(supabase-py → the RPC stand-in for PostgREST on loopback → the same Postgres), one batch
in flight at a time, as the recorder writes. Prints samples/s per transport and batch
size, and the ratio Supabase / direct.

    python bench/bench_transports.py [--samples 100000] [--batch 1000 100]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from uuid import UUID

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.localpg import LocalPostgres  # noqa: E402
from poller.migrate import migrate  # noqa: E402
from poller.models import Sample, SampleStatus  # noqa: E402
from poller.store import Store  # noqa: E402
from poller.store.postgres import PostgresStore  # noqa: E402
from poller.store.supabase import SupabaseStore  # noqa: E402
from tests.support.db import add_jobs  # noqa: E402
from tests.support.postgrest_standin import PostgrestStandIn, prepare_database  # noqa: E402

KEY = "bench-jwt-secret-0123456789abcdef0123"  # the stand-in signs keys with it
JOBS = 1000


async def record(store: Store, jobs: list[UUID], total: int, batch: int, seq0: int) -> float:
    """Write `total` samples in batches; returns samples per second."""
    now = time.time()
    samples = [Sample(jobs[i % JOBS], seq0 + i // JOBS, SampleStatus.SUCCESS, 1.25, 0.5, now)
               for i in range(total)]
    start = time.perf_counter()
    for i in range(0, total, batch):
        await store.record_batch(samples[i:i + batch], [])
    return total / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> None:
    with LocalPostgres() as pg:
        conn = await asyncpg.connect(pg.dsn)
        await prepare_database(conn)  # Supabase's roles: the stand-in runs calls as the key's
        await migrate(pg.dsn)
        jobs = await add_jobs(conn, [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(JOBS)])
        rest = PostgrestStandIn(pg.dsn, KEY)
        await rest.start()
        key = rest.key("service_role")
        stores: dict[str, Store] = {
            "direct (asyncpg)": PostgresStore(pg.dsn, 30),
            "supabase (stand-in)": SupabaseStore(rest.url, key, 30),
        }
        for store in stores.values():
            await store.open()
        seq = 0
        print(f"{'batch':>6} {'transport':<22} {'samples/s':>10}")
        try:
            for batch in args.batch:
                rates = {}
                for name, store in stores.items():
                    await record(store, jobs, batch * 3, batch, seq + 10**6)  # warm-up
                    rates[name] = await record(store, jobs, args.samples, batch, seq)
                    seq += args.samples // JOBS + 1
                    print(f"{batch:>6} {name:<22} {rates[name]:>10,.0f}", flush=True)
                direct, supa = rates.values()
                print(f"{batch:>6} {'ratio supabase/direct':<22} {supa / direct:>10.2f}")
        finally:
            for store in stores.values():
                await store.close()
            await rest.stop()
            await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 100])
    asyncio.run(main(parser.parse_args()))
