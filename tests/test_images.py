"""The images, built by tools/images.sh from the unchanged Dockerfiles, run as a cluster runs
them: an arbitrary UID with group 0, a read-only root filesystem, no capability, no new
privileges. Skipped where the images are not built; CI builds them and requires them
(SOUNDCHECK_REQUIRE_IMAGES=1)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml
from pollerfleet import render
from pollerfleet.spec import parse

from poller.localpg import free_port
from tests.support.control_plane import ControlPlane
from tests.support.db import add_jobs
from tests.support.k8s_deploy import (
    apply_manifests,
    expand,
    get,
    kubectl,
    operator_kubeconfig,
    ready_condition,
)
from tests.support.latency_standin import LatencyStandIn
from tests.support.podman import (
    OPERATOR_IMAGE,
    POLLER_IMAGE,
    RESTRICTED,
    ROOT,
    VERSION,
    container_logs,
    podman,
    podman_env,
    require_image,
)
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow


@pytest.fixture
def poller_image() -> str:
    require_image(POLLER_IMAGE)
    return POLLER_IMAGE


@pytest.fixture
def operator_image() -> str:
    require_image(OPERATOR_IMAGE)
    return OPERATOR_IMAGE


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test started; removed afterwards, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def run_detached(containers: list[str], *args: str) -> str:
    name = f"sc-test-{uuid.uuid4().hex[:8]}"
    containers.append(name)
    podman("run", "--detach", "--name", name, *args)
    return name


async def get_json(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


def in_venv(image: str, code: str) -> str:
    return podman("run", "--rm", *RESTRICTED, "--network", "none", "--entrypoint",
                  "/venv/bin/python", image, "-c", code)


@pytest.mark.parametrize(("image_fixture", "ports", "absent"), [
    ("poller_image", {"3000/tcp", "4402/tcp", "4403/tcp"},
     ["pip", "setuptools", "kopf", "kubernetes"]),
    ("operator_image", {"8080/tcp", "9090/tcp"}, ["pip", "setuptools"]),
])
def test_image_metadata_and_contents(image_fixture: str, ports: set[str], absent: list[str],
                                     request: pytest.FixtureRequest) -> None:
    image = request.getfixturevalue(image_fixture)
    (info,) = json.loads(podman("image", "inspect", image))
    config = info["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"]
    assert labels["org.opencontainers.image.source"]
    assert set(config["ExposedPorts"]) == ports
    assert config["User"] == "10001:0"
    # The runtime venv has neither the installers nor (poller) the operator's libraries.
    found = in_venv(image, "import importlib.util as u, json, sys; "
                    f"print(json.dumps([m for m in {absent!r} if u.find_spec(m)]))")
    assert json.loads(found) == []
    assert in_venv(image, "import poller.service, poller.sidecar; print('ok')").strip() == "ok"


async def test_poller_image_migrates_and_writes_samples_as_an_arbitrary_uid(
        poller_image: str, fresh_db: str, standin: LatencyStandIn,
        containers: list[str]) -> None:
    host = ["--network", "host", *RESTRICTED]  # host network: the test's Postgres on loopback
    out = await asyncio.to_thread(podman, "run", "--rm", *host, "--env",
                                  f"DATABASE_URL={fresh_db}", poller_image,
                                  "python", "-m", "poller", "migrate")
    assert "Traceback" not in out
    conn = await asyncpg.connect(fresh_db)
    try:
        ids = await add_jobs(conn, ["127.0.0.1", "127.0.0.2"], cadence_seconds=1)
        port = free_port()
        name = await asyncio.to_thread(
            run_detached, containers, *host, "--env", f"DATABASE_URL={fresh_db}",
            "--env", f"LATENCY_API_URL={standin.url}", "--env", f"PORT={port}",
            "--env", "POLL_INTERVAL_MS=500", "--env", "BATCH_FLUSH_INTERVAL_MS=200",
            poller_image)

        async def ready() -> bool:
            try:
                return (await get_json(f"http://127.0.0.1:{port}/ready"))[0] == 200
            except aiohttp.ClientError:
                return False

        async def every_job_has_samples() -> bool:
            return bool(await conn.fetchval(
                "select count(distinct job_id) from samples where job_id = any($1)",
                ids) == len(ids))

        await eventually(ready, timeout=60, what="the container's /ready")
        await eventually(every_job_has_samples, timeout=30, what="samples of every job")
        await asyncio.to_thread(podman, "stop", "--time", "20", name)
        (state,) = json.loads(await asyncio.to_thread(podman, "inspect", name))
        assert state["State"]["ExitCode"] == 0
        logs = await asyncio.to_thread(container_logs, name)
        assert "Traceback" not in logs
    finally:
        await conn.close()


def _sidecar_pod() -> tuple[list[str], str]:
    """The sidecar's args and the ping sysctl, as the rendered pod template sets them."""
    (fleet,) = yaml.safe_load_all((ROOT / "manifests" / "pollerfleet.yaml").read_text())
    template = render.statefulset("pf", "soundcheck", parse(fleet["spec"]), 1)["spec"]["template"]
    (sidecar,) = [c for c in template["spec"]["containers"] if c["name"] == "latency-sidecar"]
    (sysctl,) = [s["value"] for s in template["spec"]["securityContext"]["sysctls"]
                 if s["name"] == "net.ipv4.ping_group_range"]
    return sidecar["args"], sysctl


_ASK_SIDECAR = (
    "import json, urllib.request; "
    "r = urllib.request.urlopen('http://127.0.0.1:4402/latency/Sound%20Check/127.0.0.1/', "
    "timeout=10); print(r.read().decode())")


async def test_sidecar_image_pings_loopback_with_no_capability(
        poller_image: str, containers: list[str]) -> None:
    """Its own network namespace (loopback only), the pod template's ping sysctl, no
    capability: the ping socket answers. Without the sysctl it cannot ping at all."""
    args, sysctl = _sidecar_pod()
    name = await asyncio.to_thread(
        run_detached, containers, "--network", "none", "--sysctl",
        f"net.ipv4.ping_group_range={sysctl}", *RESTRICTED, poller_image, *args)

    async def answered() -> bool:
        proc = await asyncio.to_thread(
            subprocess.run, ["podman", "exec", name, "python", "-c", _ASK_SIDECAR],
            capture_output=True, text=True, timeout=30,
            env=podman_env())
        if proc.returncode != 0:
            return False
        reply = json.loads(proc.stdout)
        assert not reply["error"] and reply["elapsed"] > 0, reply
        return True

    await eventually(answered, timeout=30, interval=0.3, what="a ping through the sidecar")
    # Without the sysctl (the kernel's default range admits no group): no ICMP, exit 2.
    proc = await asyncio.to_thread(
        subprocess.run, ["podman", "run", "--rm", "--network", "none", *RESTRICTED,
                         poller_image, *args], capture_output=True, text=True, timeout=60,
        env=podman_env())
    assert proc.returncode == 2, proc.stderr
    assert "sidecar:" in proc.stderr


@pytest.fixture
async def operator_namespace(control_plane: ControlPlane,
                             tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """The README's manifests (CRD, namespace, RBAC, operator Deployment) in a namespace of
    the test's own, and a kubeconfig holding the operator ServiceAccount's token."""
    ns = f"img-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(apply_manifests, control_plane, ns, tmp_path / "kustomize")
    config = await asyncio.to_thread(operator_kubeconfig, control_plane, ns,
                                     tmp_path / "operator.kubeconfig")
    config.chmod(0o644)  # readable by the container's arbitrary UID
    yield ns, config
    await asyncio.to_thread(kubectl, control_plane, "delete", "namespace", ns, "--wait=false")


async def test_operator_image_acts_on_a_fleet_as_its_service_account(
        operator_image: str, operator_namespace: tuple[str, Path],
        control_plane: ControlPlane, containers: list[str]) -> None:
    ns, config = operator_namespace
    (deployment,) = [d for d in yaml.safe_load_all(
        (ROOT / "manifests" / "operator.yaml").read_text()) if d["kind"] == "Deployment"]
    port = free_port()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = [expand(a, {"POD_NAMESPACE": ns}).replace("0.0.0.0:8080", f"127.0.0.1:{port}")
            for a in container["args"]]
    name = await asyncio.to_thread(
        run_detached, containers, "--network", "host", *RESTRICTED,
        "--volume", f"{config}:/var/run/kube/config:ro", "--env",
        "KUBECONFIG=/var/run/kube/config", "--env", "POLLERFLEET_METRICS_PORT=0",
        operator_image, *args)
    fleet = {"apiVersion": "soundcheck.io/v1alpha1", "kind": "PollerFleet",
             "metadata": {"name": "img", "namespace": ns},
             "spec": {"image": POLLER_IMAGE, "latencySidecar": True,
                      "database": {"secretName": "absent", "databaseUrlKey": "database-url"}}}
    await asyncio.to_thread(kubectl, control_plane, "apply", "-f", "-",
                            stdin=json.dumps(fleet))

    async def invalid_spec() -> bool:
        got = await asyncio.to_thread(get, control_plane, ns, "pollerfleet/img")
        return ready_condition(got).get("reason") == "InvalidSpec"

    await eventually(invalid_spec, timeout=60, interval=0.2, what="Ready=False/InvalidSpec")
    status, _ = await get_json(f"http://127.0.0.1:{port}/healthz")
    assert status == 200
    logs = await asyncio.to_thread(container_logs, name)
    assert "Traceback" not in logs and "403" not in logs, logs
