"""What ships: the sdist and the wheel, built from the source tree, the wheel installed
non-editable into a fresh venv and run from there (never from the checkout).

An editable install once hid a package missing from the wheel (`poller.notices`): both images
were broken while every other test passed. Here the installed copy imports every module the
source tree has, migrates a real database, runs a poller until samples are written, and runs
the operator's handlers against a real API server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from poller.localpg import free_port
from tests.support.control_plane import ControlPlane
from tests.support.db import add_jobs
from tests.support.k8s_deploy import apply_crd, ready_condition
from tests.support.latency_standin import LatencyStandIn
from tests.support.processes import PollerProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"poller": ROOT / "poller", "pollerfleet": ROOT / "operator" / "pollerfleet"}
# Modules that need an extra the `operator` install does not bring, and the extra they name.
NEEDS_EXTRA = {"poller.mailsink": "demo"}


def source_modules() -> set[str]:
    mods = set()
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.add(".".join((pkg, *parts)))
    return mods


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel, built by `python -m build` (the wheel from the sdist, as PyPI tools
    do) from a copy of the tree, so the checkout gets no build/ or egg-info of its own."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], cwd=src, timeout=600)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def venv(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the locked dependencies (hash-checked, as the images install them)
    and the wheel with its `operator` extra, installed from the file, non-editable."""
    where = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(where)], cwd=where)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run([*pip, "--require-hashes", "--requirement", str(ROOT / "requirements-operator.lock")],
        cwd=where, timeout=900)
    # With the lock in place this installs only the wheel: its metadata's requirements
    # must all be met by the lock, or pip would fetch more (and the lock be incomplete).
    out = run([*pip, "--no-index", "--report", "-", f"{dists['wheel']}[operator]"], cwd=where)
    installed = [item["metadata"]["name"] for item in json.loads(out)["install"]]
    assert installed == ["soundcheck-poller"], installed
    yield where


def py(venv: Path) -> str:
    return str(venv / "bin" / "python")


def test_wheel_and_sdist_carry_every_module_and_sql_file(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
    in_wheel = {n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                for n in names if n.endswith(".py")}
    assert source_modules() <= in_wheel, source_modules() - in_wheel
    sql = {p.relative_to(ROOT / "poller" / "sql").as_posix()
           for p in (ROOT / "poller" / "sql").rglob("*.sql")}
    assert any(n.startswith("repeatable/") for n in sql)
    assert {f"poller/sql/{n}" for n in sql} <= names
    with tarfile.open(dists["sdist"]) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    for needed in ("pyproject.toml", "README.md", "operator/pollerfleet/handlers.py",
                   *(f"poller/sql/{n}" for n in sql)):
        assert needed in members, needed


def test_installed_copy_imports_every_module(venv: Path, tmp_path: Path) -> None:
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        mod = importlib.import_module(name)\n"
        "        out[name] = ['ok', mod.__file__]\n"
        "    except Exception as exc:\n"
        "        out[name] = [type(exc).__name__, str(exc)]\n"
        "print(json.dumps(out))\n")
    mods = sorted(source_modules())
    result = json.loads(run([py(venv), "-c", script, json.dumps(mods)], cwd=tmp_path))
    site = str(venv / "lib")
    for name in mods:
        kind, detail = result[name]
        if name in NEEDS_EXTRA:
            extra = NEEDS_EXTRA[name]
            assert kind == "ModuleNotFoundError", (name, kind, detail)
            assert f"soundcheck-poller[{extra}]" in detail, detail  # one line naming the extra
        else:
            assert kind == "ok", (name, kind, detail)
            assert detail.startswith(site), (name, detail)  # the installed copy, not the tree


async def test_installed_poller_migrates_and_writes_samples(
        venv: Path, fresh_db: str, standin: LatencyStandIn, tmp_path: Path) -> None:
    migrate = await asyncio.create_subprocess_exec(
        py(venv), "-m", "poller", "migrate", cwd=tmp_path, env={"DATABASE_URL": fresh_db},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(migrate.communicate(), 120)
    assert migrate.returncode == 0, out.decode()
    conn = await asyncpg.connect(fresh_db)
    try:
        ids = await add_jobs(conn, ["127.0.0.1", "127.0.0.2"], cadence_seconds=1)
        poller = PollerProcess({"DATABASE_URL": fresh_db, "LATENCY_API_URL": standin.url,
                                "POLL_INTERVAL_MS": "500", "BATCH_FLUSH_INTERVAL_MS": "200"},
                               python=py(venv), cwd=str(tmp_path))
        await poller.start()
        try:
            await poller.synced()
            await poller.until_ready_is(200)

            async def every_job_has_samples() -> bool:
                return bool(await conn.fetchval(
                    "select count(distinct job_id) from samples where job_id = any($1)",
                    ids) == len(ids))

            await eventually(every_job_has_samples, timeout=30, what="samples of every job")
            poller.terminate()
            assert await poller.wait() == 0, poller.log
        finally:
            await poller.kill()
        assert "Traceback" not in poller.log, poller.log
    finally:
        await conn.close()


async def test_installed_operator_loads_its_handlers_against_a_real_api_server(
        venv: Path, control_plane: ControlPlane, tmp_path: Path) -> None:
    """kopf run -m pollerfleet from the venv serves /healthz and acts on a fleet: a fleet whose
    Secret does not exist gets Ready=False/InvalidSpec, written by the installed handlers."""
    kubectl = ["kubectl", "--kubeconfig", str(control_plane.kubeconfig)]
    ns = "wheel-test"
    apply_crd(control_plane)
    run([*kubectl, "create", "namespace", ns], cwd=tmp_path)
    port = free_port()
    kopf = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "kopf"), "run", "--standalone", f"--namespace={ns}",
        f"--liveness=http://127.0.0.1:{port}/healthz", "-m", "pollerfleet", cwd=tmp_path,
        env={"KUBECONFIG": str(control_plane.kubeconfig), "POLLERFLEET_METRICS_PORT": "0",
             "PATH": str(venv / "bin")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        fleet = {"apiVersion": "soundcheck.io/v1alpha1", "kind": "PollerFleet",
                 "metadata": {"name": "wf", "namespace": ns},
                 "spec": {"image": "soundcheck-poller:test", "latencySidecar": True,
                          "database": {"secretName": "absent",
                                       "databaseUrlKey": "database-url"}}}
        (tmp_path / "fleet.json").write_text(json.dumps(fleet))
        run([*kubectl, "apply", "-f", str(tmp_path / "fleet.json")], cwd=tmp_path)

        async def invalid_spec() -> bool:
            got = await asyncio.to_thread(run, [*kubectl, "-n", ns, "get", "pollerfleet/wf",
                                                "-o", "json"], tmp_path)
            return ready_condition(json.loads(got)).get("reason") == "InvalidSpec"

        await eventually(invalid_spec, timeout=60, interval=0.2, what="Ready=False/InvalidSpec")
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(5)) as resp:
            assert resp.status == 200
    finally:
        kopf.terminate()
        out, _ = await asyncio.wait_for(kopf.communicate(), 30)
        run([*kubectl, "delete", "namespace", ns, "--wait=false"], cwd=tmp_path)
    log = out.decode(errors="replace")
    assert "Traceback" not in log, log
