"""Benchmark: failover events with the takeover on against off, side by side.

The events of tests/support/failover_events.py (a fleet of four real `python -m poller`
processes, 80 jobs at 1-3 s cadences, the scripted latency stand-in, a throwaway Postgres,
the direct transport): a graceful stop, a rolling update, two pods with one ordinal,
kill -9, SIGSTOP for 5 s, a pod cut from the database for 5 s. Each runs twice on a fresh
database: with the takeover on (a fleet: topology, handover, failover after 2 s) and off
(REPLICA_COUNT=4: fixed ownership, as the original service). Prints the slots missed and
due for each, on | off. tests/test_failover.py asserts the "on" column.

    python bench/bench_takeover.py
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.localpg import LocalPostgres  # noqa: E402
from tests.support import failover_events as ev  # noqa: E402
from tests.support.latency_standin import LatencyStandIn  # noqa: E402
from tests.support.postgrest_standin import migrate_like_supabase  # noqa: E402
from tests.support.processes import PollerProcess  # noqa: E402

Event = Callable[[ev.Fleet, ev.Finish, str], Awaitable[ev.Outcome]]
EVENTS: list[Event] = [
    lambda fleet, finish, dsn: ev.graceful_stop(fleet, finish),
    lambda fleet, finish, dsn: ev.rolling_update(fleet, finish),
    lambda fleet, finish, dsn: ev.two_pods_one_ordinal(fleet, finish),
    lambda fleet, finish, dsn: ev.kill(fleet, finish),
    lambda fleet, finish, dsn: ev.freeze(fleet, finish),
    ev.cut_from_the_database,
]


async def finish(running: list[PollerProcess]) -> None:
    await ev.stop_all(running)


async def main() -> None:
    names = (f"bench_{n}" for n in itertools.count())
    with LocalPostgres() as pg:
        admin = await asyncpg.connect(pg.dsn)
        await admin.execute("create database bench_template")
        await migrate_like_supabase(f"postgresql://postgres@127.0.0.1:{pg.port}/bench_template")
        rows = []
        for event in EVENTS:  # bounded: six events, two modes each
            for takeover in (True, False):
                name = next(names)
                await admin.execute(f"create database {name} template bench_template")
                dsn = f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"
                standin = LatencyStandIn(rtt_ms=2.5)
                await standin.start()
                conn = await asyncpg.connect(dsn)
                fleet = await ev.start_fleet(conn, {"DATABASE_URL": dsn}, standin.url,
                                             standin.requests, takeover)
                try:
                    out = await event(fleet, finish, dsn)
                finally:
                    await fleet.close()
                    await conn.close()
                    await standin.stop()
                rows.append(f"{out.event:<38} {'on ' if takeover else 'off'} | {out.text}")
                print(rows[-1], flush=True)
        await admin.close()
    print(f"\nfailover events, fleet of 4, failover timeout {ev.FAILOVER_S}s: slots missed "
          "with the takeover on | off")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
