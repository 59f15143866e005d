"""The PollerFleet operator end to end: kopf (in its own thread) against kmock as the
Kubernetes API, and the fleet load from a real Postgres through the SQL API."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import kmock
import pytest
from kubernetes import client as kc
from pollerfleet import kube

from tests.support.db import add_jobs
from tests.support.kube_api import FilledEmulator, OperatorThread

pytestmark = pytest.mark.slow

NS = "default"
FLEETS = kmock.resource("soundcheck.io", "v1alpha1", "pollerfleets")
STS = kmock.resource("apps", "v1", "statefulsets")
SVC = kmock.resource("", "v1", "services")
PDB = kmock.resource("policy", "v1", "poddisruptionbudgets")
EVENTS = kmock.resource("", "v1", "events")


class Cluster:
    def __init__(self, emu: FilledEmulator, server: kmock.Server) -> None:
        self.emu = emu
        self.server = server
        self.url = str(server.url).rstrip("/")

    def get(self, resource: Any, name: str) -> dict[str, Any] | None:
        key = (resource, NS, name)
        if key not in self.emu.objects or self.emu.objects[key].deleted:
            return None
        return self.emu.objects[key].raw  # type: ignore[no-any-return]

    async def until(self, cond: Callable[[], bool], timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            await self.emu.progress.wait_for(cond)

    async def post(self, path: str, body: dict[str, Any]) -> None:
        async with self.server.client.post(f"{self.url}{path}", json=body) as resp:
            assert resp.status in (200, 201), await resp.text()

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.server.client.patch(f"{self.url}{path}", json=body,
                                            headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [obj.raw for key, obj in self.emu.objects.items()
                if key[0] == EVENTS and not obj.deleted and obj.raw.get("reason") == reason]

    def fleet_status(self, name: str) -> dict[str, Any]:
        return (self.get(FLEETS, name) or {}).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        for cond in self.fleet_status(name).get("conditions", []):
            if cond["type"] == kind:
                return cond  # type: ignore[no-any-return]
        return {}

    def replicas(self, name: str) -> int | None:
        sts = self.get(STS, name)
        return None if sts is None else sts["spec"]["replicas"]


@pytest.fixture
async def cluster(dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("DB_TIMEOUT_MS", "2000")
    async with FilledEmulator() as emu, kmock.Server(emu) as server:
        emu.resources.load_bundled()
        emu.resources[FLEETS] = {
            "kind": "PollerFleet", "namespaced": True, "singular": "pollerfleet",
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            "subresources": ["status"]}
        c = Cluster(emu, server)
        cfg = kc.Configuration(host=c.url)
        kube.configure(kc.ApiClient(cfg))
        await c.post(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "soundcheck-db"},
            "data": {"database-url": base64.b64encode(dsn.encode()).decode()}})
        operator = OperatorThread(c.url, NS)
        await asyncio.to_thread(operator.start)
        try:
            yield c
        finally:
            await asyncio.to_thread(operator.stop)
            kube.configure(None)
        assert operator.error is None, operator.error


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
    owner_uid = cluster.get(FLEETS, "pf")["metadata"]["uid"]  # type: ignore[index]
    for res in (STS, SVC, PDB):
        refs = cluster.get(res, "pf")["metadata"]["ownerReferences"]  # type: ignore[index]
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
    assert cluster.get(PDB, "pf")["spec"]["maxUnavailable"] == 1  # type: ignore[index]
    assert cluster.fleet_status("pf")["observedGeneration"] == 1


async def test_replicas_follow_the_load(cluster: Cluster, conn: asyncpg.Connection) -> None:
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
    await cluster.until(lambda: cluster.replicas("load") == 1)
    assert time.monotonic() - lowered >= 2  # not before the stabilization window

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
