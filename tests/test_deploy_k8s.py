"""The README's "Deploy on Kubernetes" steps, command for command, on a real control plane.

The commands are read from the README, so the docs cannot drift from what works. The operator
then runs as the Deployment says (its args and env, the Secret's value resolved as a kubelet
would) with its ServiceAccount's TokenRequest token, never admin; the real StatefulSet,
ReplicaSet and garbage-collector controllers do the rest. No kubelet runs: the test starts
the operator's container as a local process, and poller pods stay Pending (created and
admitted, not run).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from pollerfleet import render
from pollerfleet.spec import parse

from poller.localpg import LocalPostgres
from tests.conftest import TEMPLATE
from tests.support.control_plane import ControlPlane
from tests.support.k8s_deploy import Operator, get, kubectl, ready_condition, start_operator
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NS = "soundcheck"
SA = f"system:serviceaccount:{NS}:pollerfleet-operator"
FLEET = "soundcheck-poller"


def readme_deploy_commands() -> list[str]:
    """The shell commands of the README's "Deploy on Kubernetes" block, one per command
    (backslash continuations joined, comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on Kubernetes", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's Deploy section has no sh block"
    text = block.group(1).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


@dataclass
class Deployed:
    plane: ControlPlane
    operator: Operator
    database_url: str

    def kubectl(self, *args: str, check: bool = True) -> str:
        return kubectl(self.plane, *args, check=check)

    def get(self, *args: str) -> Any:
        return get(self.plane, NS, *args)

    async def until(self, cond: Any, what: str, timeout: float = 30) -> None:
        async def probe() -> bool:
            return bool(await asyncio.to_thread(cond))
        await eventually(probe, timeout=timeout, interval=0.2, what=what)


def _ready(fleet: dict[str, Any]) -> bool:
    return ready_condition(fleet).get("status") == "True"


async def _database(pg: LocalPostgres) -> str:
    name = f"deploy_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg.dsn)
    try:
        await admin.execute(f"create database {name} template {TEMPLATE}")
    finally:
        await admin.close()
    return f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"


@pytest.fixture(scope="module")
def deployed_sync(control_plane: ControlPlane, pg_server: LocalPostgres,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The README's steps as written (the database URL filled in), then the operator."""
    database_url = asyncio.run(_database(pg_server))
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    for command in readme_deploy_commands():
        command = command.replace("postgresql://…", database_url)
        proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        # Nothing the steps apply may be refused or warned about (PodSecurity warns too).
        assert "Warning" not in proc.stderr, f"{command}\n{proc.stderr}"
        if command.startswith("kubectl apply -f crds/"):  # as `kubectl wait` would
            kubectl(control_plane, "wait", "--for=condition=Established", "--timeout=30s",
                    "crd/pollerfleets.soundcheck.io")
    operator = start_operator(control_plane, NS, tmp_path_factory.mktemp("deploy"))
    try:
        yield Deployed(control_plane, operator, database_url)
    finally:
        operator.stop()
        kubectl(control_plane, "delete", "namespace", NS, "--wait=false")


@pytest.fixture
async def deployed(deployed_sync: Deployed) -> AsyncIterator[Deployed]:
    yield deployed_sync


def test_readme_steps_are_the_ones_run() -> None:
    commands = readme_deploy_commands()
    assert commands[0] == "kubectl apply -f crds/pollerfleet.yaml"
    assert "kubectl apply -k manifests/" in commands
    assert commands[-2] == "kubectl apply -f manifests/pollerfleet.yaml"


async def test_example_fleet_is_ready_with_its_objects_within_seconds(
        deployed: Deployed) -> None:
    await deployed.until(lambda: _ready(deployed.get("pollerfleet", FLEET)), "Ready=True")
    sts = deployed.get("statefulset", FLEET)
    assert deployed.get("service", FLEET)["spec"]["clusterIP"] == "None"
    assert deployed.get("poddisruptionbudget", FLEET)["spec"]["maxUnavailable"] == 1
    owner = sts["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("PollerFleet", FLEET)
    # The real StatefulSet controller made the pods from the rendered template, and the
    # namespace's PodSecurity "restricted" admitted them (a refusal shows as FailedCreate).
    replicas = sts["spec"]["replicas"]
    await deployed.until(lambda: len(deployed.get("pods", "-l",
                                                  f"app.kubernetes.io/instance={FLEET}")
                                     ["items"]) == replicas, "the fleet's pods")
    events = deployed.get("events", "--field-selector", "reason=FailedCreate")["items"]
    assert events == [], [e["message"] for e in events]
    # The namespace warns at "restricted" too: the StatefulSet the operator applied, sent
    # again as a server-side dry run, draws no PodSecurity warning.
    proc = await asyncio.to_thread(subprocess.run, [
        "kubectl", "--kubeconfig", str(deployed.plane.kubeconfig), "apply", "--dry-run=server",
        "--server-side", "--field-manager=dry-run-check", "--force-conflicts", "-f", "-"],
        input=json.dumps({k: sts[k] for k in ("apiVersion", "kind", "metadata", "spec")}
                         | {"metadata": {"name": FLEET, "namespace": NS}}),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


async def test_operator_pod_is_admitted_and_the_operator_is_never_refused(
        deployed: Deployed) -> None:
    await deployed.until(lambda: _ready(deployed.get("pollerfleet", FLEET)), "Ready=True")
    pods = deployed.get("pods", "-l", "app.kubernetes.io/name=pollerfleet-operator")["items"]
    assert len(pods) == 1  # made by the real ReplicaSet controller, admitted as restricted
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{deployed.operator.health_port}/healthz",
            timeout=aiohttp.ClientTimeout(5)) as resp:
        assert resp.status == 200
    assert deployed.operator.proc.poll() is None


_CAN_I_ROW = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def _can_i(deployed: Deployed, namespace: str) -> dict[tuple[str, str], set[str]]:
    """`kubectl auth can-i --list` as the operator: (resource, group) -> verbs, without the
    non-resource URLs and self-reviews that every authenticated user has."""
    out = deployed.kubectl("auth", "can-i", "--list", f"--as={SA}", "-n", namespace)
    rules: dict[tuple[str, str], set[str]] = {}
    for line in out.splitlines():
        row = _CAN_I_ROW.match(line)
        if not row or not row.group(1) or row.group(1) == "Resources":
            continue
        resource, _, _, verbs = row.groups()
        base, _, sub = resource.partition("/")
        name, _, group = base.partition(".")
        if name.startswith("selfsubject"):
            continue
        rules[(f"{name}/{sub}" if sub else name, group)] = set(verbs.split())
    return rules


# What the operator calls (operator/pollerfleet: handlers.py, kube.py; kopf's own watches).
OPERATOR_CALLS_IN_NAMESPACE = {
    ("pollerfleets", "soundcheck.io"): {"get", "list", "watch", "patch"},
    ("pollerfleets/status", "soundcheck.io"): {"get", "patch"},
    ("statefulsets", "apps"): {"get", "create", "patch"},
    ("services", ""): {"get", "create", "patch"},
    ("poddisruptionbudgets", "policy"): {"get", "create", "patch"},
    ("secrets", ""): {"get"},
    ("events", ""): {"create"},
    ("events", "events.k8s.io"): {"create"},
}
OPERATOR_CALLS_CLUSTER_WIDE = {
    ("customresourcedefinitions", "apiextensions.k8s.io"): {"get", "list", "watch"},
    ("namespaces", ""): {"list", "watch"},
}


def test_rbac_is_exactly_what_the_operator_calls(deployed: Deployed) -> None:
    cluster = _can_i(deployed, "default")  # any other namespace: the cluster-wide rules
    in_ns = _can_i(deployed, NS)
    assert cluster == OPERATOR_CALLS_CLUSTER_WIDE, cluster
    assert in_ns == {**OPERATOR_CALLS_CLUSTER_WIDE, **OPERATOR_CALLS_IN_NAMESPACE}, in_ns
    for verb in ("list", "watch"):
        assert deployed.kubectl("auth", "can-i", verb, "secrets", f"--as={SA}", "-n", NS,
                                check=False).strip().startswith("no")


def test_rendered_pods_run_as_any_uid_and_write_only_where_group_0_can() -> None:
    (fleet,) = yaml.safe_load_all((ROOT / "manifests" / "pollerfleet.yaml").read_text())
    pod = render.statefulset("pf", NS, parse(fleet["spec"]), 2)["spec"]["template"]["spec"]
    operator_pod = next(d for d in yaml.safe_load_all(
        (ROOT / "manifests" / "operator.yaml").read_text()))["spec"]["template"]["spec"]
    for spec in (pod, operator_pod):
        assert "runAsUser" not in spec.get("securityContext", {})
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert "runAsUser" not in sc and sc["readOnlyRootFilesystem"] is True
            assert [m["mountPath"] for m in c.get("volumeMounts", [])] in ([], ["/tmp"])


async def test_kubectl_scale_is_undone(deployed: Deployed) -> None:
    await deployed.until(lambda: _ready(deployed.get("pollerfleet", FLEET)), "Ready=True")
    desired = deployed.get("statefulset", FLEET)["spec"]["replicas"]
    # The example syncs every 30 s; a shorter interval keeps the test short (a spec change
    # wakes the operator at once).
    deployed.kubectl("-n", NS, "patch", "pollerfleet", FLEET, "--type=merge", "-p",
                     '{"spec": {"syncIntervalSeconds": 1}}')
    deployed.kubectl("-n", NS, "scale", "statefulset", FLEET, f"--replicas={desired + 3}")
    await deployed.until(lambda: deployed.get("statefulset", FLEET)["spec"]["replicas"]
                         == desired, "the StatefulSet back at the operator's size")


def test_operator_was_never_refused_nor_failed(deployed: Deployed) -> None:
    """Its log from the README's steps to here (before the API server restart below, which
    refuses and resets requests while it starts)."""
    log = deployed.operator.log()
    assert "Initial authentication has finished" in log
    assert "Forbidden" not in log and " 403" not in log, log
    assert "Traceback" not in log, log


async def test_operator_survives_an_api_server_restart(deployed: Deployed) -> None:
    await deployed.until(lambda: _ready(deployed.get("pollerfleet", FLEET)), "Ready=True")
    await asyncio.to_thread(deployed.plane.stop_apiserver)
    await asyncio.to_thread(deployed.plane.start_apiserver)
    # Its watch resumed: a spec change made after the restart is acted on.
    deployed.kubectl("-n", NS, "patch", "pollerfleet", FLEET, "--type=merge", "-p",
                     '{"spec": {"minReplicas": 2, "syncIntervalSeconds": 1}}')
    await deployed.until(lambda: deployed.get("statefulset", FLEET)["spec"]["replicas"] == 2,
                         "the StatefulSet at the new minimum", timeout=60)
    assert deployed.operator.proc.poll() is None


async def test_deleting_the_fleet_lets_the_garbage_collector_remove_what_it_owned(
        deployed: Deployed) -> None:
    await deployed.until(lambda: _ready(deployed.get("pollerfleet", FLEET)), "Ready=True")
    deployed.kubectl("-n", NS, "delete", "pollerfleet", FLEET, "--wait=true")

    def gone() -> bool:
        left = deployed.kubectl("-n", NS, "get", "statefulsets,services,pdb,pods", "-l",
                                f"app.kubernetes.io/instance={FLEET}", "-o", "name")
        return left.strip() == ""

    await deployed.until(gone, "the fleet's objects collected", timeout=60)
    assert await asyncio.to_thread(deployed.operator.stop) == 0
