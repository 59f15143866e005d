"""The PollerFleet operator end to end: kopf (in its own thread) against kmock as the
Kubernetes API, and the fleet load from a real Postgres through the SQL API."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pollerfleet import metrics

from tests.support.db import add_jobs
from tests.support.kube_api import (
    FLEETS,
    NS,
    PDB,
    STS,
    SVC,
    Cluster,
    FakePods,
    running_operator,
)

pytestmark = pytest.mark.slow

@pytest.fixture
async def cluster(dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("DB_TIMEOUT_MS", "2000")
    async with running_operator(dsn) as c:
        yield c


def fleet(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "soundcheck.io/v1alpha1", "kind": "PollerFleet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "image": "registry.example/soundcheck-poller:1.0",
            "database": {"secretName": "soundcheck-db", "databaseUrlKey": "database-url"},
            "latencySidecar": True, "jobsPerReplica": 10, "minReplicas": 1, "maxReplicas": 5,
            "scaleDownStabilizationSeconds": 2, "syncIntervalSeconds": 1, **spec,
        },
    }


async def test_create_renders_the_owned_objects(cluster: Cluster) -> None:
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("pf", minReplicas=2))
    await cluster.until(lambda: cluster.get(STS, "pf") is not None
                        and cluster.get(SVC, "pf") is not None
                        and cluster.get(PDB, "pf") is not None
                        and cluster.condition("pf", "Ready").get("status") == "True")
    owner_uid = cluster.existing(FLEETS, "pf")["metadata"]["uid"]
    for res in (STS, SVC, PDB):
        refs = cluster.existing(res, "pf")["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r["controller"]) for r in refs] == [
            ("PollerFleet", owner_uid, True)]
    sts = cluster.get(STS, "pf")
    assert sts is not None
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    pod = sts["spec"]["template"]["spec"]
    poller, sidecar = pod["containers"]
    env = {e["name"]: e for e in poller["env"]}
    assert env["REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']")
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "soundcheck-db", "key": "database-url"}
    assert env["LATENCY_API_URL"]["value"] == "http://127.0.0.1:4402"
    assert pod["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ping_group_range", "value": "0 2147483647"}]
    for c in (poller, sidecar):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert poller["livenessProbe"]["httpGet"]["path"] == "/health"
    assert poller["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert cluster.existing(PDB, "pf")["spec"]["maxUnavailable"] == 1
    assert cluster.fleet_status("pf")["observedGeneration"] == 1


@pytest.fixture
async def pods(cluster: Cluster, dsn: str) -> AsyncIterator[None]:
    """Pods that become ready and sync with the topology, for the fleet named "load"."""
    own = await asyncpg.connect(dsn)
    fake = asyncio.create_task(FakePods(cluster, own, "load").run())
    yield
    fake.cancel()
    await asyncio.gather(fake, return_exceptions=True)
    await own.close()


async def test_replicas_follow_the_load(cluster: Cluster, conn: asyncpg.Connection,
                                        pods: None) -> None:
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("load", minReplicas=0))
    await cluster.until(lambda: cluster.fleet_status("load").get("runningJobs") == 0)
    assert cluster.replicas("load") == 0  # nothing to ping, minReplicas 0

    ids = await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 26)])
    await cluster.until(lambda: cluster.replicas("load") == 3  # ceil(25 / 10), at once
                        and cluster.fleet_status("load").get("runningJobs") == 25)
    await cluster.until(lambda: bool(cluster.events("Scaled")))  # events are posted async

    await conn.execute("update jobs set status = 'cancelled' where id = any($1::uuid[])",
                       ids[5:])
    lowered = time.monotonic()
    await cluster.until(lambda: cluster.fleet_status("load").get("runningJobs") == 5)
    assert cluster.replicas("load") == 3  # the window has not passed yet
    await cluster.until(lambda: cluster.replicas("load") == 1
                        and cluster.fleet_status("load").get("topology") == "1")
    assert time.monotonic() - lowered >= 2  # not before the stabilization window
    # … and only after handing 3 → 1 over: [3, 1] published, seen by all, collapsed.
    assert await conn.fetchval("select counts from poller_topology where fleet = $1",
                               f"{NS}/load") == [1]

    await conn.execute("update jobs set status = 'completed' where id = any($1::uuid[])", ids)
    await cluster.until(lambda: cluster.replicas("load") == 0
                        and cluster.fleet_status("load").get("desiredReplicas") == 0)


async def test_spec_update_updates_the_template(cluster: Cluster) -> None:
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(path, fleet("upd"))
    await cluster.until(lambda: cluster.get(STS, "upd") is not None)
    await cluster.patch(f"{path}/upd", {"spec": {
        "image": "registry.example/soundcheck-poller:2.0",
        "pollerEnv": {"BATCH_SIZE": "1000"}}})

    def updated() -> bool:
        sts = cluster.get(STS, "upd")
        poller = sts["spec"]["template"]["spec"]["containers"][0] if sts else {}
        return (poller.get("image") == "registry.example/soundcheck-poller:2.0"
                and {"name": "BATCH_SIZE", "value": "1000"} in poller.get("env", [])
                and cluster.fleet_status("upd").get("observedGeneration") == 2)

    await cluster.until(updated)


async def test_load_unreadable_keeps_the_size_and_degrades(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch, conn: asyncpg.Connection) -> None:
    await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 31)])
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(path, fleet("deg"))
    await cluster.until(lambda: cluster.replicas("deg") == 3)
    from pollerfleet import load

    # The database goes away: the next reads fail.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    await asyncio.to_thread(_run_in_operator_loop_close, load)
    await cluster.until(lambda: cluster.condition("deg", "Degraded").get("status") == "True")
    assert cluster.condition("deg", "Degraded")["reason"] == "LoadUnavailable"
    assert cluster.replicas("deg") == 3  # never scaled down on an error
    await cluster.until(lambda: len(cluster.events("LoadUnavailable")) == 1)


def _run_in_operator_loop_close(load: Any) -> None:
    """Forget the open store, so the next read connects with the new settings."""
    load._store = None


@pytest.mark.parametrize(("spec", "message"), [
    ({"minReplicas": 4, "maxReplicas": 2}, "spec.minReplicas: 4 is above spec.maxReplicas 2"),
    ({"database": {"secretName": "missing", "databaseUrlKey": "x"}},
     "Secret 'missing' not found"),
    ({"database": {"secretName": "soundcheck-db", "databaseUrlKey": "nope"}},
     "has no key nope"),
    ({"notifications": {"webhook": {"secretName": "missing", "urlKey": "url"}}},
     "spec.notifications.webhook.secretName: Secret 'missing' not found"),
    ({"notifications": {"email": {"host": "smtp", "from": "a@example.com",
                                  "secretName": "soundcheck-db", "usernameKey": "u",
                                  "passwordKey": "p"}}},
     "spec.notifications.email: Secret 'soundcheck-db' has no key p, u"),
])
async def test_invalid_spec_gives_a_condition_and_one_event(
        cluster: Cluster, spec: dict[str, Any], message: str) -> None:
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("bad", **spec))
    await cluster.until(lambda: cluster.condition("bad", "Ready").get("reason") == "InvalidSpec"
                        and len(cluster.events("InvalidSpec")) == 1)
    assert message in cluster.condition("bad", "Ready")["message"]
    # Handled again (a spec edit that does not fix it): same condition, no second event,
    # no exception for kopf to retry.
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets/bad"
    await cluster.patch(path, {"spec": {"image": "registry.example/soundcheck-poller:1.1"}})
    await cluster.until(lambda: cluster.fleet_status("bad").get("observedGeneration") == 2)
    assert message in cluster.condition("bad", "Ready")["message"]
    assert len(cluster.events("InvalidSpec")) == 1
    assert cluster.get(STS, "bad") is None


async def test_growth_is_handed_over_through_two_counts(
        cluster: Cluster, conn: asyncpg.Connection, pods: None) -> None:
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("load"))
    await cluster.until(lambda: cluster.fleet_status("load").get("topology") == "1")
    epoch = await conn.fetchval("select epoch from poller_topology where fleet = $1",
                                f"{NS}/load")
    await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 26)])
    await cluster.until(lambda: cluster.fleet_status("load").get("topology") == "3"
                        and cluster.replicas("load") == 3)
    # Two publications: [1, 3] (pods ready, overlap), then [3] (every pod had seen it).
    assert await conn.fetchval("select epoch from poller_topology where fleet = $1",
                               f"{NS}/load") == epoch + 2
    beats = await conn.fetch("select replica_id, counts from poller_heartbeats "
                             "where fleet = $1 order by 1", f"{NS}/load")
    assert [b["replica_id"] for b in beats] == [0, 1, 2]


async def test_stale_jobs_make_the_fleet_degraded(
        cluster: Cluster, conn: asyncpg.Connection, pods: None) -> None:
    await add_jobs(conn, ["127.0.0.1", "127.0.0.2"], cadence_seconds=5)
    await conn.execute("update jobs set started_at = now() - interval '1 minute'")
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("load", staleJobsWindowSeconds=0))
    await cluster.until(lambda: cluster.condition("load", "Degraded").get("reason")
                        == "StaleJobs" and len(cluster.events("StaleJobs")) == 1)
    assert cluster.fleet_status("load")["staleJobs"] == 2
    assert metrics.registry.get_sample_value(
        "soundcheck_operator_stale_jobs", {"fleet": f"{NS}/load"}) == 2
    await conn.execute("update jobs set last_ping_at = now()")
    await cluster.until(lambda: cluster.condition("load", "Degraded").get("status") == "False")


async def test_an_operator_restart_mid_handover_resumes(
        cluster: Cluster, conn: asyncpg.Connection, dsn: str) -> None:
    ids = await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 31)])
    own = await asyncpg.connect(dsn)
    fake = FakePods(cluster, own, "load")
    pods = asyncio.create_task(fake.run())
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("load"))
    await cluster.until(lambda: cluster.fleet_status("load").get("topology") == "3")
    pods.cancel()  # the pods stop reporting: the next handover cannot complete …
    await asyncio.gather(pods, return_exceptions=True)
    await conn.execute("update jobs set status = 'cancelled' where id = any($1::uuid[])",
                       ids[10:])
    await cluster.until(lambda: cluster.fleet_status("load").get("topology") == "3+1")
    await cluster.stop_operator()  # … and the operator goes away in the middle of it
    assert cluster.replicas("load") == 3  # nothing was lowered before the hand-over
    await cluster.start_operator()
    pods = asyncio.create_task(fake.run())
    try:
        await cluster.until(lambda: cluster.fleet_status("load").get("topology") == "1"
                            and cluster.replicas("load") == 1)
    finally:
        pods.cancel()
        await asyncio.gather(pods, return_exceptions=True)
        await own.close()


async def test_lowering_max_replicas_shrinks_through_the_handover(
        cluster: Cluster, conn: asyncpg.Connection, pods: None) -> None:
    await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 41)])
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(path, fleet("load"))
    await cluster.until(lambda: cluster.fleet_status("load").get("topology") == "4"
                        and cluster.replicas("load") == 4)
    await cluster.patch(f"{path}/load", {"spec": {"maxReplicas": 2}})
    await cluster.until(lambda: cluster.fleet_status("load").get("observedGeneration") == 2)
    assert cluster.replicas("load") == 4  # the spec update itself removes no pod …
    await cluster.until(lambda: cluster.replicas("load") == 2
                        and cluster.fleet_status("load").get("topology") == "2")
    # … the timer hands 4 → 2 over first (three publications: [4], [4, 2], [2]).
    assert await conn.fetchval("select epoch from poller_topology where fleet = $1",
                               f"{NS}/load") >= 3


async def test_what_the_spec_no_longer_says_leaves_the_template(cluster: Cluster) -> None:
    # On a real API server a strategic-merge patch keeps list entries it does not mention
    # (env, containers by name): a removed pollerEnv key or sidecar stayed, and switching
    # to Supabase left DATABASE_URL beside SUPABASE_*, which the poller refuses.
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sb"},
        "data": {"url": "aHR0cDovL3NiLmV4YW1wbGU=", "key": "c2VjcmV0"}})
    await cluster.post(path, fleet("trim", pollerEnv={"BATCH_SIZE": "500",
                                                      "LOG_FORMAT": "json"}))

    def poller_env() -> set[str]:
        sts = cluster.get(STS, "trim")
        containers = sts["spec"]["template"]["spec"]["containers"] if sts else []
        return {e["name"] for e in containers[0]["env"]} if containers else set()

    await cluster.until(lambda: {"BATCH_SIZE", "DATABASE_URL"} <= poller_env())
    await cluster.patch(f"{path}/trim", {"spec": {
        "pollerEnv": {"BATCH_SIZE": None}, "latencySidecar": False,  # merge patch: removed
        "latencyApiUrl": "http://spreedb.internal:4402",
        "database": {"secretName": "sb", "databaseUrlKey": None, "supabaseUrlKey": "url",
                     "serviceRoleKeyKey": "key"}}})
    await cluster.until(lambda: "SUPABASE_URL" in poller_env())
    sts = cluster.get(STS, "trim")
    assert sts is not None
    assert [c["name"] for c in sts["spec"]["template"]["spec"]["containers"]] == ["poller"]
    env = poller_env()
    assert "BATCH_SIZE" not in env and "DATABASE_URL" not in env, env
    assert {"LOG_FORMAT", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"} <= env


async def test_the_emulation_merges_like_the_api_server(cluster: Cluster) -> None:
    # The strictness the test above relies on: a dict patch from the kubernetes client is a
    # strategic merge, and an env entry it leaves out stays.
    from kubernetes import client as kc
    from pollerfleet import kube

    body: Any = {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "smp", "namespace": NS},
            "spec": {"replicas": 1, "serviceName": "smp", "selector": {"matchLabels": {"a": "b"}},
                     "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
                         {"name": "c", "image": "i",
                          "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]}}}}
    apps = kc.AppsV1Api(kube.api())
    await asyncio.to_thread(apps.create_namespaced_stateful_set, NS, body)
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "9"}]
    await asyncio.to_thread(apps.patch_namespaced_stateful_set, "smp", NS, body)
    env = cluster.existing(STS, "smp")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "9"}, {"name": "B", "value": "2"}]


async def test_a_new_fleet_is_written_once_at_its_size(cluster: Cluster) -> None:
    # Before: the create handler and the timer raced and the size went 3 → 0 → 3.
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(path, fleet("once", minReplicas=3, syncIntervalSeconds=1))
    await cluster.until(lambda: cluster.fleet_status("once").get("topology") == "3")
    # A few more syncs and a spec edit: the size never moves.
    await cluster.patch(f"{path}/once", {"spec": {"image": "registry.example/p:3"}})
    await cluster.until(lambda: cluster.fleet_status("once").get("observedGeneration") == 2)
    assert cluster.replicas_history("once") == [3]


def _count_state_reads(monkeypatch: pytest.MonkeyPatch, name: str) -> list[float]:
    """When (monotonic) the operator reads the state of fleet `name`, from now on."""
    from pollerfleet import load

    reads: list[float] = []
    real = load.fleet_state

    async def counted(fleet: str) -> Any:
        if fleet.endswith(f"/{name}"):
            reads.append(time.monotonic())
        return await real(fleet)

    monkeypatch.setattr(load, "fleet_state", counted)
    return reads


async def test_the_sync_interval_is_the_one_the_spec_says(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _count_state_reads(monkeypatch, "tick")
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(path, fleet("tick", syncIntervalSeconds=1))
    await cluster.until(lambda: len(reads) >= 5, timeout=20)
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    # Every second (before: every 5 s, the operator's fixed tick, whatever the spec said).
    assert all(0.9 <= g <= 2.0 for g in gaps[:4]), gaps


async def test_a_wall_clock_step_neither_stops_nor_rushes_the_fleet(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch, conn: asyncpg.Connection) -> None:
    # Before: sync timing and the stabilization window used time.time(): a step back
    # stopped syncing, a step forward emptied the window and shrank the fleet at once.
    reads = _count_state_reads(monkeypatch, "clock")
    ids = await add_jobs(conn, [f"127.0.0.{i}" for i in range(1, 31)])
    path = f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets"
    await cluster.post(path, fleet("clock", syncIntervalSeconds=1,
                                   scaleDownStabilizationSeconds=3600))
    await cluster.until(lambda: cluster.replicas("clock") == 3)
    await conn.execute("update jobs set status = 'cancelled' where id = any($1::uuid[])",
                       ids[10:])
    real_time = time.time
    for step in (-3600.0, 7200.0):  # an hour back, then an hour ahead of the real time
        def shifted(by: float = step) -> float:
            return real_time() + by

        monkeypatch.setattr(time, "time", shifted)
        seen = len(reads)

        def synced_thrice(since: int = seen) -> bool:
            return len(reads) >= since + 3

        await cluster.until(synced_thrice)  # still syncing
        assert cluster.replicas("clock") == 3  # and no shrink before the window has passed
    assert cluster.fleet_status("clock").get("runningJobs") == 10


async def test_the_status_shows_the_notices_waiting(cluster: Cluster, conn: asyncpg.Connection,
                                                    pods: None) -> None:
    await cluster.post(f"/apis/soundcheck.io/v1alpha1/namespaces/{NS}/pollerfleets",
                       fleet("notices"))
    await cluster.until(lambda: cluster.fleet_status("notices").get("pendingNotices") == 0)
    # Two jobs complete through a batch: two completion notices wait for delivery.
    ids = await add_jobs(conn, ["127.0.0.1", "127.0.0.2"], duration_minutes=0)
    await conn.fetchval("select poller_record_samples('{}', '{}', '{}', '{}', '{}', '{}', "
                        "$1::uuid[])", ids)
    await cluster.until(lambda: cluster.fleet_status("notices").get("pendingNotices") == 2)
    assert cluster.fleet_status("notices").get("failedNotices") == 0
    assert metrics.registry.get_sample_value("soundcheck_operator_notices_pending",
                                             {"fleet": f"{NS}/notices"}) == 2
