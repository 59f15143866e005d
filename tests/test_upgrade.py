"""Upgrades without a gap (CHANGELOG.md, "Compatibility rule"), from the previous release as
git history names it.

The previous release's tree is taken from git (`git archive` of the commit its CHANGELOG
entry names) and run from that tree with this venv's packages (the dependency pins are
the same). Not its wheel: 0.1.0's wheel lacks `poller.notices` and cannot run at all, the
defect 0.2.0 fixed.

- Pollers: the previous release's fleet runs; this release's migrations are applied under
  it; the fleet is rolled to this release one pod at a time, as a StatefulSet does, then
  rolled back. No slot missed, no error in either release's logs.
- Operator: this release's operator takes over a fleet the previous one made, without
  re-creating its StatefulSet and without rolling its pods (the template did not change).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import poller
from poller.localpg import free_port
from tests.support.checks import due_between, load
from tests.support.control_plane import ControlPlane
from tests.support.db import add_jobs
from tests.support.k8s_deploy import apply_manifests, get, kubectl, operator_kubeconfig
from tests.support.latency_standin import LatencyStandIn
from tests.support.processes import PollerProcess
from tests.support.releases import checkout, env_for, previous_release, run_migrate
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FLEET = "soundcheck/up"
HOLD_S = 2.0
MARGIN_S = 1.0
ENV = {"POLL_INTERVAL_MS": "500", "BATCH_FLUSH_INTERVAL_MS": "200",
       "RETRY_MAX_BACKOFF_MS": "400", "DB_TIMEOUT_MS": "2000", "SHUTDOWN_GRACE_MS": "10000",
       "LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    version, commit = previous_release()
    return version, checkout(commit, tmp_path_factory.mktemp(f"release-{version}"))


def _pod(env: dict[str, str], ordinal: int, tree: Path | None) -> PollerProcess:
    return PollerProcess({**env, "HOSTNAME": f"up-{ordinal}", **env_for(tree)},
                         cwd=str(tree or ROOT))


async def _versions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("select version from poller_heartbeats where fleet = $1", FLEET)
    return {r["version"] for r in rows}


async def test_fleet_upgrades_under_new_migrations_and_rolls_back_without_a_gap(
        fresh_db: str, standin: LatencyStandIn, previous: tuple[str, Path]) -> None:
    version, tree = previous
    await run_migrate(fresh_db, tree)
    conn = await asyncpg.connect(fresh_db)
    pods: dict[int, PollerProcess] = {}
    everyone: list[PollerProcess] = []
    try:
        ids = await add_jobs(conn, [f"127.0.6.{i}" for i in range(1, 61)],
                             cadence_seconds=[1 + i % 2 for i in range(60)])
        await conn.fetchval("select poller_publish_topology($1, '{2}')", FLEET)
        await conn.execute("select poller_set_failover($1, 2)", FLEET)
        env = {**ENV, "DATABASE_URL": fresh_db, "LATENCY_API_URL": standin.url,
               "FLEET_NAME": FLEET}

        async def start(ordinal: int, release: Path | None) -> None:
            pods[ordinal] = _pod(env, ordinal, release)
            everyone.append(pods[ordinal])
            await pods[ordinal].start()
            await pods[ordinal].synced()

        async def roll(release: Path | None) -> None:
            """Highest ordinal first, one at a time: stop (it hands its share over), the
            replacement, its first sync, the next."""
            for ordinal in (1, 0):
                pods[ordinal].terminate()
                assert await pods[ordinal].wait() == 0, pods[ordinal].log[-3000:]
                await start(ordinal, release)

        await asyncio.gather(start(0, tree), start(1, tree))
        begin = time.time()
        assert await _versions(conn) == {version}  # the previous release's code runs
        await asyncio.sleep(HOLD_S)
        applied = await run_migrate(fresh_db, None)  # this release's migrations, under it
        assert "repeatable/50_samples: applied" in applied, applied
        await asyncio.sleep(HOLD_S)
        await roll(None)
        await eventually(lambda: _is(conn, {poller.__version__}), timeout=10,
                         what="every heartbeat from this release")
        await asyncio.sleep(HOLD_S)
        await roll(tree)  # the rollback, on the new schema
        await eventually(lambda: _is(conn, {version}), timeout=10,
                         what="every heartbeat from the previous release")
        await asyncio.sleep(HOLD_S)
        end = time.time()
        for pod in pods.values():
            pod.terminate()
        assert [await p.wait() for p in pods.values()] == [0, 0]
        missed = due = 0
        for job in await load(conn, ids):
            slots = due_between(job, begin + MARGIN_S, end - MARGIN_S)
            due += len(slots)
            missed += len(slots - set(job.seqs))
        print(f"\nupgrade {version} → {poller.__version__} and back, migrations applied "
              f"under the fleet: {due} slots due, {missed} missed")
        assert due > 500
        assert missed == 0
    finally:
        for p in everyone:
            await p.kill()
        await conn.close()
    for p in everyone:
        bad = [line for line in p.lines if "Traceback" in line or " ERROR " in line]
        assert not bad, (p.env.get("PYTHONPATH", "this release"), bad[:5])


async def _is(conn: asyncpg.Connection, versions: set[str]) -> bool:
    return await _versions(conn) == versions


@pytest.fixture
async def operator_env(control_plane: ControlPlane, dsn: str,
                       tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    ns = f"upgr-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(apply_manifests, control_plane, ns, tmp_path / "kustomize")
    await asyncio.to_thread(kubectl, control_plane, "-n", ns, "create", "secret", "generic",
                            "soundcheck-db", f"--from-literal=database-url={dsn}")
    config = await asyncio.to_thread(operator_kubeconfig, control_plane, ns,
                                     tmp_path / "operator.kubeconfig")
    yield ns, config
    await asyncio.to_thread(kubectl, control_plane, "delete", "namespace", ns, "--wait=false")


def _operator(ns: str, config: Path, dsn: str, tree: Path | None,
              log: Path) -> subprocess.Popen[bytes]:
    kopf = str(Path(sys.executable).parent / "kopf")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [kopf, "run", "--standalone", f"--namespace={ns}",
             f"--liveness=http://127.0.0.1:{free_port()}/healthz", "-m", "pollerfleet"],
            cwd=tree or ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={"KUBECONFIG": str(config), "DATABASE_URL": dsn, "PATH": "/usr/bin:/bin",
                 "POLLERFLEET_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1",
                 **env_for(tree)})


async def test_new_operator_adopts_the_previous_operators_fleet(
        control_plane: ControlPlane, operator_env: tuple[str, Path], dsn: str,
        previous: tuple[str, Path], tmp_path: Path) -> None:
    ns, config = operator_env
    _, tree = previous
    fleet = (f"apiVersion: soundcheck.io/v1alpha1\nkind: PollerFleet\n"
             f"metadata: {{name: up, namespace: {ns}}}\n"
             "spec: {image: 'soundcheck-poller:test', latencySidecar: true, minReplicas: 2, "
             "syncIntervalSeconds: 1, database: {secretName: soundcheck-db, "
             "databaseUrlKey: database-url}}\n")
    old = _operator(ns, config, dsn, tree, tmp_path / "old.log")
    try:
        await asyncio.to_thread(kubectl, control_plane, "apply", "-f", "-", stdin=fleet)

        async def made() -> bool:
            out = await asyncio.to_thread(kubectl, control_plane, "-n", ns, "get",
                                          "statefulset", "up", "--ignore-not-found",
                                          "-o", "name")
            return bool(out.strip())
        await eventually(made, timeout=60, interval=0.2, what="the old operator's StatefulSet")
        before = await asyncio.to_thread(get, control_plane, ns, "statefulset", "up")
    finally:
        old.terminate()
        old.wait(30)
    assert "soundcheck.io/replicas" not in (before["metadata"].get("annotations") or {})
    new = _operator(ns, config, dsn, None, tmp_path / "new.log")
    try:
        async def adopted() -> bool:  # this release marks the size it applied
            sts = await asyncio.to_thread(get, control_plane, ns, "statefulset", "up")
            return "soundcheck.io/replicas" in (sts["metadata"].get("annotations") or {})
        await eventually(adopted, timeout=60, interval=0.2, what="the new operator's apply")
        after = await asyncio.to_thread(get, control_plane, ns, "statefulset", "up")
    finally:
        new.terminate()
        new.wait(30)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # not re-created
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]  # no roll
    assert after["spec"]["replicas"] == before["spec"]["replicas"] == 2
    for log in ("old.log", "new.log"):
        text = (tmp_path / log).read_text(errors="replace")
        assert "Traceback" not in text and "Forbidden" not in text, (log, text[-3000:])
