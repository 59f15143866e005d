"""Offline checks of everything that goes to a cluster: manifests, the CRD, the objects the
operator renders, the example fleet against the CRD's own schema, and the Dockerfiles."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pollerfleet import render
from pollerfleet.spec import parse

from tests.support.kustomize import kustomize

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.32"  # oldest we support: the pod-index label needs 1.28+
MANIFESTS = sorted((ROOT / "manifests").glob("*.yaml"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name != "kustomization.yaml"
                                  and p.name != "pollerfleet.yaml"], ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for obj in docs(path):
        validate(obj)


def test_kustomization_lists_existing_files() -> None:
    (kust,) = docs(ROOT / "manifests" / "kustomization.yaml")
    for name in kust["resources"]:
        assert (ROOT / "manifests" / name).exists(), name


COMPONENTS = sorted((ROOT / "manifests" / "components").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("kust", COMPONENTS, ids=lambda p: p.parent.name)
def test_components_are_valid_kubernetes(kust: Path) -> None:
    (component,) = docs(kust)
    assert component["kind"] == "Component"
    for name in component["resources"]:
        for obj in docs(kust.parent / name):
            validate(obj)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("namespace", [None, "elsewhere"])
def test_network_policy_lands_with_the_pollers(tmp_path: Path, namespace: str | None) -> None:
    """The README's usage, literally (and with a namespace of the user's): the policy is in
    the namespace of the operator, hence of its fleets, and selects the poller pods."""
    objs = kustomize(tmp_path, ROOT / "manifests" / "components" / "network-policy",
                     namespace=namespace)
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
    operator = next(o for o in objs if o["kind"] == "Deployment")
    assert policy["metadata"]["namespace"] == operator["metadata"]["namespace"] == (
        namespace or "soundcheck")
    pod_labels = render.statefulset("pf", "ns", parse({
        "image": "i", "latencySidecar": True,
        "database": {"secretName": "s", "databaseUrlKey": "k"}}), 1)["spec"]["template"][
        "metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {render.PORT, render.SIDECAR_HEALTH_PORT}


def test_crd_is_valid() -> None:
    (crd,) = docs(ROOT / "crds" / "pollerfleet.yaml")
    validate(crd)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Running", "Desired", "Ready", "Age"} <= columns


def crd_schema() -> dict[str, Any]:
    (crd,) = docs(ROOT / "crds" / "pollerfleet.yaml")
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_example_fleet_matches_the_crd_schema_and_the_operator() -> None:
    (fleet,) = docs(ROOT / "manifests" / "pollerfleet.yaml")
    jsonschema.validate(fleet, crd_schema())
    parse(fleet["spec"])  # and the operator accepts it


@pytest.mark.parametrize("bad", [
    {"jobsPerReplica": 0}, {"minReplicas": -1}, {"image": ""}, {"latencyApiUrl": "spreedb"},
    {"pollerEnv": {"BATCH_SIZE": 1000}},
    {"notifications": {"email": {"host": "smtp", "from": "a@b.c", "tls": "ssl"}}},
    {"notifications": {"email": {"from": "a@b.c"}}},
    {"notifications": {"webhook": {"secretName": "s"}}},
])
def test_crd_schema_rejects(bad: dict[str, Any]) -> None:
    (fleet,) = docs(ROOT / "manifests" / "pollerfleet.yaml")
    fleet["spec"].update(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(fleet, crd_schema())


@pytest.mark.parametrize("sidecar", [True, False])
def test_rendered_objects_are_valid_kubernetes(sidecar: bool) -> None:
    (fleet,) = docs(ROOT / "manifests" / "pollerfleet.yaml")
    spec = dict(fleet["spec"])
    if not sidecar:
        spec["latencySidecar"] = False
        spec["latencyApiUrl"] = "http://spreedb.internal:4402"
    parsed = parse(spec)
    for obj in (render.statefulset("pf", "soundcheck", parsed, 3),
                render.service("pf", "soundcheck"), render.pdb("pf", "soundcheck")):
        validate(obj)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
@pytest.mark.parametrize("dockerfile", ["Dockerfile.poller", "Dockerfile.operator"])
def test_dockerfile_is_hadolint_clean(dockerfile: str) -> None:
    proc = subprocess.run(["hadolint", str(ROOT / dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("dockerfile", "lock"), [("Dockerfile.poller", "requirements.lock"),
                                                  ("Dockerfile.operator",
                                                   "requirements-operator.lock")])
def test_image_installs_from_its_hashed_lock_and_runs_as_non_root(dockerfile: str,
                                                                  lock: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert f"--require-hashes --requirement {lock}" in text
    # The dependency layer comes before the source is copied in: a source change reuses it.
    assert text.index(f"--requirement {lock}") < text.index("COPY poller")
    final = text.rsplit("FROM ", 1)[1]
    assert "USER 10001:0" in final and "pip install" not in final  # no build steps there
    # One pinned base for both stages, by digest.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}$",
                     text, re.M)
    assert text.count("FROM ${BASE_IMAGE}") == 2


def locked(lock: str) -> dict[str, list[str]]:
    """A hashed lock file: name -> its hashes."""
    pins: dict[str, list[str]] = {}
    name = ""
    for line in (ROOT / lock).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("--hash=sha256:"):
            pins[name].append(stripped.removeprefix("--hash=sha256:").rstrip(" \\"))
            continue
        assert "==" in stripped, f"{lock}: not pinned: {stripped}"
        name = stripped.split("==")[0].lower().replace("_", "-")
        pins[name] = []
    return pins


@pytest.mark.parametrize(("lock", "needed"), [
    ("requirements.lock", {"aiohttp", "asyncpg", "pydantic", "pydantic-settings",
                           "prometheus-client", "supabase"}),
    ("requirements-operator.lock", {"aiohttp", "asyncpg", "supabase", "kopf", "kubernetes"}),
    ("requirements-build.lock", {"setuptools"}),
])
def test_lock_pins_and_hashes_every_dependency(lock: str, needed: set[str]) -> None:
    pins = locked(lock)
    assert needed <= pins.keys(), needed - pins.keys()
    assert all(pins.values()), [n for n, hashes in pins.items() if not hashes]


def test_poller_lock_leaves_the_operator_libraries_out() -> None:
    assert not {"kopf", "kubernetes"} & locked("requirements.lock").keys()


def test_build_backend_is_pinned_alike_in_pyproject_and_the_lock() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (pin,) = re.findall(r"^(setuptools==\S+)", (ROOT / "requirements-build.lock").read_text(),
                        re.M)
    assert requires == [pin]


def test_one_version_everywhere() -> None:
    """poller.__version__ is the release; the wheel takes it (pyproject's dynamic version),
    and the manifests' image tags and the Dockerfiles' default label say the same."""
    import poller

    version = poller.__version__
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dynamic"] == [
        "version"]
    tags = re.findall(r"image: \S+:(\S+)", (ROOT / "manifests" / "pollerfleet.yaml").read_text()
                      + (ROOT / "manifests" / "operator.yaml").read_text())
    assert tags and set(tags) == {version}
    for dockerfile in ("Dockerfile.poller", "Dockerfile.operator"):
        assert f"ARG VERSION={version}\n" in (ROOT / dockerfile).read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)} ", changelog, re.M), "no CHANGELOG entry"
