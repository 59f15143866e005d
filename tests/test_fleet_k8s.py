"""The whole fleet on a real control plane, its pods run by the node agent.

The manifests applied as documented, the operator as its ServiceAccount, the real
StatefulSet controller making poller pods from the rendered template, the node agent running
each pod (poller + latency sidecar, real ICMP on the pod's own loopback) in a network
namespace of its own and reporting the probes, the real garbage collector at the end.

Running jobs go 0 → 150 → 350 → 150 (jobsPerReplica 100), then a `pollerEnv` change rolls
the pods through the real StatefulSet controller. Every slot that fell due while its job was
running and a pod was serving must have a sample.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from poller.localpg import LocalPostgres
from tests.support.control_plane import ControlPlane
from tests.support.fleet_runner import Counters
from tests.support.fleet_slots import Jobs, missed_slots
from tests.support.k8s_deploy import Operator, apply_manifests, get, kubectl, start_operator
from tests.support.netns import unavailable_reason
from tests.support.node_agent import NodeAgent
from tests.support.postgrest_standin import migrate_like_supabase
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow
PER_REPLICA = 100
HOLD_S = 3.0
FLEET = "fleet"
POLLER_SELECTOR = "app.kubernetes.io/name=soundcheck-poller"


@dataclass
class Env:
    plane: ControlPlane
    ns: str
    agent: NodeAgent
    operator: Operator
    pg: LocalPostgres
    socket_url: str

    async def get(self, *what: str) -> Any:
        return await asyncio.to_thread(get, self.plane, self.ns, *what)

    async def find(self, *what: str) -> Any:
        """The object, or {} while it does not exist."""
        out = await asyncio.to_thread(kubectl, self.plane, "-n", self.ns, "get", *what,
                                      "-o", "json", "--ignore-not-found", check=False)
        return json.loads(out) if out.strip() else {}

    async def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return await asyncio.to_thread(kubectl, self.plane, "-n", self.ns, *args, stdin=stdin)


@pytest.fixture
async def env(control_plane: ControlPlane, tmp_path: Path) -> AsyncIterator[Env]:
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    if not control_plane.has_controllers:
        pytest.skip("no kube-controller-manager: no StatefulSet controller to make pods")
    # The pods live in network namespaces of their own, so they reach Postgres through a
    # Unix socket in a folder every user may enter (the default one is the server's own).
    sockets = Path(tempfile.mkdtemp(prefix="sc-pgsock-"))
    os.chmod(sockets, 0o1777)
    pg = LocalPostgres()
    pg.settings["unix_socket_directories"] = f"{pg.root},{sockets}"
    await asyncio.to_thread(pg.start)
    await migrate_like_supabase(pg.dsn)
    socket_url = f"postgresql://postgres@/postgres?host={sockets}&port={pg.port}"
    ns = f"fleet-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(apply_manifests, control_plane, ns, tmp_path / "kustomize")
    await asyncio.to_thread(kubectl, control_plane, "-n", ns, "create", "secret", "generic",
                            "soundcheck-db", f"--from-literal=database-url={socket_url}")
    agent = NodeAgent(control_plane, ns, POLLER_SELECTOR, tmp_path / "pods",
                      node=f"node-{ns}")
    await agent.start()
    operator = await asyncio.to_thread(start_operator, control_plane, ns, tmp_path)
    try:
        yield Env(control_plane, ns, agent, operator, pg, socket_url)
    finally:
        await asyncio.to_thread(operator.stop)
        await agent.close()
        await asyncio.to_thread(kubectl, control_plane, "delete", "namespace", ns,
                                "--wait=false")
        await asyncio.to_thread(pg.destroy)
        os.rmdir(sockets)


def _fleet(ns: str) -> str:
    return f"""
apiVersion: soundcheck.io/v1alpha1
kind: PollerFleet
metadata: {{name: {FLEET}, namespace: {ns}}}
spec:
  image: soundcheck-poller:test
  jobsPerReplica: {PER_REPLICA}
  minReplicas: 0
  maxReplicas: 4
  scaleDownStabilizationSeconds: 2
  syncIntervalSeconds: 1
  terminationGracePeriodSeconds: 20
  database: {{secretName: soundcheck-db, databaseUrlKey: database-url}}
  latencySidecar: true
  pollerEnv:
    POLL_INTERVAL_MS: "300"
    BATCH_FLUSH_INTERVAL_MS: "200"
    LOG_LEVEL: INFO
"""


async def _settled(env: Env, n: int, timeout: float = 120) -> None:
    """The StatefulSet at n, n pods ready (as the agent probes them), the fleet's topology
    [n], and every pod on the current template."""
    async def done() -> bool:
        fleet = await env.find("pollerfleet", FLEET)
        sts = await env.find("statefulset", FLEET)
        if not sts:
            return False
        status = sts.get("status", {})
        return (sts["spec"]["replicas"] == n and status.get("readyReplicas", 0) == n
                and len(env.agent.ready_pods()) == n
                and status.get("currentRevision") == status.get("updateRevision")
                and (n == 0 or fleet.get("status", {}).get("topology") == str(n)))
    try:
        await eventually(done, timeout=timeout, interval=0.3, what=f"{n} ready replicas")
    except TimeoutError as exc:
        fleet = await env.find("pollerfleet", FLEET)
        sts = await env.find("statefulset", FLEET)
        raise AssertionError(f"{exc}: fleet status {fleet.get('status')}, StatefulSet "
                             f"{sts.get('spec', {}).get('replicas')} {sts.get('status')}, "
                             f"ready pods {env.agent.ready_pods()}, operator log:\n"
                             f"{env.operator.log()[-3000:]}") from exc


async def test_fleet_serves_resizes_and_rolls_on_the_real_controllers(env: Env) -> None:
    conn = await asyncpg.connect(env.pg.dsn)
    jobs = Jobs(conn)
    counters = Counters()
    env.agent.on_serving = lambda serving: _mark(counters, serving)
    try:
        await env.kubectl("apply", "-f", "-", stdin=_fleet(env.ns))
        await _settled(env, 0)  # from zero: nothing runs, no pod
        for running in (150, 350, 150):
            await jobs.set(running)
            await _settled(env, -(-running // PER_REPLICA))
            await asyncio.sleep(HOLD_S)  # the observed stretch at this size
        # A template change: the real StatefulSet controller replaces the pods one by one.
        before = (await env.get("statefulset", FLEET))["status"]["currentRevision"]
        await env.kubectl("patch", "pollerfleet", FLEET, "--type=merge", "-p",
                          '{"spec": {"pollerEnv": {"LOG_LEVEL": "DEBUG"}}}')

        async def rolled() -> bool:
            revision = (await env.get("statefulset", FLEET))["status"].get("updateRevision")
            return bool(revision != before)
        await eventually(rolled, timeout=30, what="a new template revision")
        await _settled(env, 2)
        await asyncio.sleep(HOLD_S)
        end = time.time()
        missed = await missed_slots(conn, jobs, counters, end)
        print(f"\nreal control plane, node agent: slots due while a pod served "
              f"{missed.served}, missed {missed.served_missing}; all slots due "
              f"{missed.due}, missed {missed.due_missing}")
        assert missed.served > 1000
        assert missed.served_missing == 0, missed.missing_at
        # Deleting the fleet: the real garbage collector removes the StatefulSet, and the
        # agent stops its pods with SIGTERM.
        await env.kubectl("delete", "pollerfleet", FLEET)

        async def collected() -> bool:
            left = await env.kubectl("get", "statefulsets,services,pdb,pods", "-l",
                                     POLLER_SELECTOR, "-o", "name")
            return left.strip() == "" and not env.agent.pods
        await eventually(collected, timeout=60, interval=0.3, what="the fleet collected")
    finally:
        await conn.close()
    for path in sorted(env.agent.logs.glob("*-poller-*.log")):
        text = path.read_text(errors="replace")
        assert "Traceback" not in text, (path.name, text[-3000:])
    assert "Forbidden" not in env.operator.log()


def _mark(counters: Counters, serving: bool) -> None:
    timeline = counters.serving
    if serving and (not timeline or timeline[-1][1] != float("inf")):
        timeline.append([time.time(), float("inf")])
    elif not serving and timeline and timeline[-1][1] == float("inf"):
        timeline[-1][1] = time.time()
