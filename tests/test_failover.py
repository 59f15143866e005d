"""Failover with real poller processes (a fleet of 4, jobs at 1-3 s cadences): a graceful
stop hands a replica's share over before it stops pinging (zero missed slots), and a
replica lost without warning (kill -9, SIGSTOP, cut from the database) has its share taken
over once its heartbeat is older than the fleet's failover timeout. Jobs that end during
an event are completed once, with their rollups. Both transports.

The events live in tests/support/failover_events.py; bench/bench_takeover.py runs the same
events with the takeover switched off too and prints the two side by side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import DbEnv
from tests.support import failover_events as ev
from tests.support.latency_standin import LatencyStandIn
from tests.support.processes import PollerProcess

pytestmark = [pytest.mark.slow,
              pytest.mark.parametrize("db_env", ["postgres", "supabase"], indirect=True)]


@pytest.fixture
async def fleet(conn: asyncpg.Connection, dsn: str, db_env: DbEnv,
                standin: LatencyStandIn) -> AsyncIterator[ev.Fleet]:
    fleet = await ev.start_fleet(conn, await db_env(dsn), standin.url, standin.requests,
                                 takeover=True)
    try:
        yield fleet
    finally:
        await fleet.close()


def finish_for(fleet: ev.Fleet) -> ev.Finish:
    """The end of an event: the jobs that ended meanwhile were completed once; every process
    still running stops cleanly; no duplicate rows."""
    async def finish(running: list[PollerProcess]) -> None:
        await ev.ending_jobs_completed_once(fleet.conn)
        assert await ev.stop_all(running) == [0] * len(running)
        await ev.no_duplicate_rows(fleet.conn)
    return finish


def assert_taken_over(out: ev.Outcome) -> None:
    """A replica lost without warning: its share is pinged again within the failover timeout
    (plus a sync or two), and nothing is missed after that."""
    assert out.taken_after_s is not None and out.taken_after_s < ev.FAILOVER_S + 3, out
    assert out.missed_after_takeover == 0, out
    assert out.due_after_takeover, out


async def test_a_graceful_stop_hands_over_before_it_stops(fleet: ev.Fleet) -> None:
    out = await ev.graceful_stop(fleet, finish_for(fleet))
    assert out.due > 0 and out.missed == 0, out.text


async def test_a_rolling_update_misses_no_slot(fleet: ev.Fleet) -> None:
    out = await ev.rolling_update(fleet, finish_for(fleet))
    assert out.due > 0 and out.missed == 0, out.text


async def test_two_pods_with_one_ordinal_do_no_harm(fleet: ev.Fleet) -> None:
    out = await ev.two_pods_one_ordinal(fleet, finish_for(fleet))
    assert out.due > 0 and out.missed == 0, out.text


async def test_a_killed_replica_is_taken_over_after_the_failover_timeout(
        fleet: ev.Fleet) -> None:
    assert_taken_over(await ev.kill(fleet, finish_for(fleet)))


async def test_a_frozen_replica_is_covered_and_gives_back_when_it_wakes(
        fleet: ev.Fleet) -> None:
    assert_taken_over(await ev.freeze(fleet, finish_for(fleet)))


async def test_a_replica_cut_from_the_database_is_covered(fleet: ev.Fleet, dsn: str) -> None:
    if "DATABASE_URL" not in fleet.procs[1].env:
        pytest.skip("the cut is a TCP proxy in front of Postgres: direct transport only")
    out = await ev.cut_from_the_database(fleet, finish_for(fleet), dsn)
    assert_taken_over(out)
    # It pinged on and wrote its buffer once healed: nothing is missed at all.
    assert out.due > 0 and out.missed == 0, out.text
