"""The whole fleet resizing for real: a real Postgres, kmock as the Kubernetes API, the
operator (kopf in its thread), real poller processes started and stopped by a test-side
StatefulSet controller, and the latency sidecar pinging loopback addresses with real ICMP.

Running jobs go 40 → 400 → 100 → 0 → 250 (jobsPerReplica 100), then a change of the pod
template (`pollerEnv`) rolls the pods one by one. Every slot that fell due while its job
was running and a pod was serving must have exactly one sample. The same
schedule without the handover (REPLICA_COUNT in the pod environment, rolling restarts)
runs as a comparison and its missed slots are printed beside.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import asyncpg
import pytest

from poller.partition import BUCKETS, jump_hash, owned_buckets
from tests.support.fleet_runner import FleetRunner, RollingRunner
from tests.support.fleet_slots import Jobs, Missed, missed_slots
from tests.support.kube_api import NS, Cluster, running_operator

pytestmark = pytest.mark.slow

SCHEDULE = [40, 400, 100, 0, 250]
PER_REPLICA = 100
HOLD_S = 3.0


@dataclass
class Transition:
    before: int
    after: int
    moved: float | None
    expected: float | None
    start: float  # when the running jobs changed
    end: float = float("inf")  # when the next change came


def moved_fraction(before: int, after: int) -> tuple[float, float]:
    moved = sum(jump_hash(b, before) != jump_hash(b, after) for b in range(BUCKETS)) / BUCKETS
    return moved, 1 - min(before, after) / max(before, after)


def poller_env(dsn: str, sidecar: str) -> dict[str, str]:
    return {"DATABASE_URL": dsn, "LATENCY_API_URL": sidecar, "POLL_INTERVAL_MS": "300",
            "BATCH_FLUSH_INTERVAL_MS": "200", "PING_TIMEOUT_MS": "2000",
            "SHUTDOWN_GRACE_MS": "10000", "CONCURRENCY": "500", "LOG_LEVEL": "INFO"}


async def settled(cluster: Cluster, runner: FleetRunner, n: int) -> None:
    def done() -> bool:
        status = cluster.fleet_status("fleet")
        return (cluster.replicas("fleet") == n and len(runner.ready) == n
                and len(runner.procs) == n and status.get("runningJobs") is not None
                and (n == 0 or status.get("topology") == str(n)))
    await cluster.until(done, timeout=90)


async def test_fleet_resizes_without_gaps(dsn: str, sidecar: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    conn = await asyncpg.connect(dsn)
    jobs = Jobs(conn)
    transitions: list[Transition] = []
    async with running_operator(dsn) as cluster:
        runner = FleetRunner(cluster, "fleet", poller_env(dsn, sidecar))
        controller = asyncio.create_task(runner.run())
        try:
            await jobs.set(SCHEDULE[0])
            await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets", {
                "apiVersion": "soundcheck.io/v1alpha1", "kind": "PollerFleet",
                "metadata": {"name": "fleet"},
                "spec": {"image": "poller:test", "latencyApiUrl": sidecar,
                         "jobsPerReplica": PER_REPLICA, "minReplicas": 0, "maxReplicas": 8,
                         "scaleDownStabilizationSeconds": 2, "syncIntervalSeconds": 1,
                         "database": {"secretName": "soundcheck-db",
                                      "databaseUrlKey": "database-url"}}})
            size = math.ceil(SCHEDULE[0] / PER_REPLICA)
            await settled(cluster, runner, size)
            await asyncio.sleep(HOLD_S)  # the observed stretch at this size
            for target in SCHEDULE[1:]:
                changed = time.time()
                if transitions:
                    transitions[-1].end = changed
                await jobs.set(target)
                after = math.ceil(target / PER_REPLICA)
                await settled(cluster, runner, after)
                await _assert_partition(cluster, conn, after)
                moved, expected = moved_fraction(size, after) if size and after else (None,
                                                                                      None)
                transitions.append(Transition(size, after, moved, expected, changed))
                size = after
                await asyncio.sleep(HOLD_S)
            # A rolling update of the template: each pod stopped (handing its share over)
            # and replaced in turn, by the StatefulSet controller.
            rolled = time.time()
            transitions[-1].end = rolled
            await cluster.patch(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets/"
                                "fleet", {"spec": {"pollerEnv": {"LOG_LEVEL": "DEBUG"}}})
            await cluster.until(lambda: runner.replaced == size and len(runner.ready) == size,
                                timeout=120)
            await asyncio.sleep(HOLD_S)
            rolled_end = time.time()
        finally:
            controller.cancel()
            await asyncio.gather(controller, return_exceptions=True)
            await runner.close()
    end = time.time()
    missed = await missed_slots(conn, jobs, runner.counters, end)
    duplicates = runner.counters.pings - runner.counters.inserted

    baseline = await _rolling_baseline(dsn, sidecar)
    print("\nwhole fleet, handover on:")
    for t in transitions:
        shown = "—" if t.moved is None else f"{t.moved:.3f} (expected {t.expected:.3f})"
        print(f"  {t.before} → {t.after} replicas: buckets moved {shown}, slots missed "
              f"until the next change: {missed.missed_between(t.start, t.end)}")
    print(f"  rolling update of the template ({runner.replaced} pods replaced): slots missed "
          f"{missed.missed_between(rolled, rolled_end)}")
    print(f"  slots due while a pod served: {missed.served}, missed {missed.served_missing}; "
          f"all slots due: {missed.due}, missed {missed.due_missing}; "
          f"duplicate pings absorbed: {duplicates}")
    print(f"handover off (REPLICA_COUNT, rolling restarts): slots due while a pod served: "
          f"{baseline.served}, missed {baseline.served_missing}; all slots due: "
          f"{baseline.due}, missed {baseline.due_missing}")
    assert missed.served > 1000
    assert runner.replaced == size
    assert missed.served_missing == 0
    for t in transitions:
        if t.moved is not None and t.expected is not None:
            sd = math.sqrt(t.expected * (1 - t.expected) / BUCKETS)
            assert abs(t.moved - t.expected) <= 4 * sd + 1e-9, t
    await conn.close()


async def _assert_partition(cluster: Cluster, conn: asyncpg.Connection, n: int) -> None:
    """After a handover every pod applies [n], and the owners partition the buckets."""
    if n == 0:
        return
    async with asyncio.timeout(30):
        while True:  # each pod reports [n] with its next sync; re-read as the operator ticks
            beats = await conn.fetch("select replica_id, counts from poller_heartbeats "
                                     "where fleet = $1 and replica_id < $2", f"{NS}/fleet", n)
            if len(beats) == n and all(list(b["counts"]) == [n] for b in beats):
                break
            await cluster.emu.progress.next()
    shares = [owned_buckets(b["replica_id"], b["counts"]) for b in beats]
    assert sum(map(len, shares)) == BUCKETS and frozenset().union(*shares) == set(
        range(BUCKETS))


async def _rolling_baseline(dsn: str, sidecar: str) -> Missed:
    """The same schedule the original way."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("update jobs set status = 'cancelled' where status = 'running'")
    await conn.execute("truncate samples")
    jobs = Jobs(conn)
    jobs.made = 100_000  # fresh addresses
    runner = RollingRunner("rolling", poller_env(dsn, sidecar))
    started = time.time()
    try:
        for target in SCHEDULE:
            await jobs.set(target)
            await runner.resize(math.ceil(target / PER_REPLICA))
            await asyncio.sleep(HOLD_S)
    finally:
        await runner.close()
    await conn.execute("delete from jobs where extract(epoch from started_at) < $1", started)
    missed = await missed_slots(conn, jobs, runner.counters, time.time())
    await conn.close()
    return missed
