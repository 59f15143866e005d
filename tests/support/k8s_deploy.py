"""The project's manifests on the real control plane, and the operator run as its Deployment
says, with its ServiceAccount's token (never admin)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poller.localpg import free_port
from tests.support.control_plane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_SA = "pollerfleet-operator"


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None,
            check: bool = True) -> str:
    """kubectl as admin (the tests' own setup and checks)."""
    proc = subprocess.run(["kubectl", "--kubeconfig", str(plane.kubeconfig), *args],
                          input=stdin, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def get(plane: ControlPlane, ns: str, *what: str) -> Any:
    return json.loads(kubectl(plane, "-n", ns, "get", *what, "-o", "json"))


def ready_condition(fleet: dict[str, Any]) -> dict[str, Any]:
    """A PollerFleet's Ready condition as its status says it ({} while there is none)."""
    conds = (fleet.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Ready"), {})


def apply_crd(plane: ControlPlane) -> None:
    """The CRD as the README's Deploy steps apply it (client-side `kubectl apply`), so a later
    test that runs those steps on the same control plane finds what a user would."""
    kubectl(plane, "apply", "-f", str(ROOT / "crds" / "pollerfleet.yaml"))
    kubectl(plane, "wait", "--for=condition=Established", "--timeout=30s",
            "crd/pollerfleets.soundcheck.io")


def apply_manifests(plane: ControlPlane, ns: str, work: Path) -> None:
    """The CRD, then manifests/ through a kustomization of the documented kind
    (`resources: [<repo>/manifests]`) that moves it to `ns`. The operator Deployment is kept
    at 0 replicas: the test runs the operator itself (`start_operator`)."""
    apply_crd(plane)
    work.mkdir(parents=True, exist_ok=True)
    (work / "kustomization.yaml").write_text(
        f"namespace: {ns}\nresources: [{os.path.relpath(ROOT / 'manifests', work)}]\n"
        "patches:\n- target: {kind: Deployment}\n"
        "  patch: '[{\"op\": \"replace\", \"path\": \"/spec/replicas\", \"value\": 0}]'\n")
    kubectl(plane, "apply", "-k", str(work))


def operator_kubeconfig(plane: ControlPlane, ns: str, path: Path) -> Path:
    """A kubeconfig with a TokenRequest token of the operator's ServiceAccount."""
    token = kubectl(plane, "-n", ns, "create", "token", OPERATOR_SA).strip()
    return plane.write_kubeconfig(path, f"system:serviceaccount:{ns}:{OPERATOR_SA}", token,
                                  namespace=ns)


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """A kubelet's expansion of `$(VAR)` in args and env values: a defined variable is
    replaced, an undefined one is left as written, `$$` is a literal `$`."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(one, text)


def secrets_named(container: dict[str, Any]) -> set[str]:
    """The Secrets a container's env reads (secretKeyRef)."""
    return {item["valueFrom"]["secretKeyRef"]["name"] for item in container.get("env", [])
            if "secretKeyRef" in item.get("valueFrom", {})}


def pod_fields(meta: dict[str, Any], node: str) -> dict[str, str]:
    """The fieldRef paths a pod's env may name, with their values."""
    fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "spec.nodeName": node}
    fields |= {f"metadata.labels['{k}']": v for k, v in (meta.get("labels") or {}).items()}
    return fields


def container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]],
                  fields: dict[str, str]) -> dict[str, str]:
    """The container's env as a kubelet makes it: values with `$(VAR)` expanded,
    secretKeyRef from `secrets` (name -> the Secret's base64 data, as the caller read it)
    and fieldRef from `fields` (pod_fields)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@dataclass
class Operator:
    proc: subprocess.Popen[bytes]
    log_file: Path
    health_port: int
    kubeconfig: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)


def start_operator(plane: ControlPlane, ns: str, work: Path) -> Operator:
    """The operator Deployment's container, as applied, run as a local process: its args and
    env (and the image's ENV), the port it binds on all addresses moved to a free loopback
    port, and the ServiceAccount's token as a kubeconfig in place of the in-cluster one."""
    kubeconfig = operator_kubeconfig(plane, ns, work / "operator.kubeconfig")
    deployment = get(plane, ns, "deployment", OPERATOR_SA)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    health_port = free_port()
    # Secrets read as admin, as the kubelet reads them with its own rights.
    secrets = {name: get(plane, ns, "secret", name)["data"] for name in secrets_named(container)}
    container_vars = container_env(container, secrets, pod_fields(
        {"name": f"{OPERATOR_SA}-local", "namespace": ns}, "local"))
    args = [expand(a, container_vars).replace("0.0.0.0:8080", f"127.0.0.1:{health_port}")
            for a in container["args"]]
    bin_dir = str(Path(sys.executable).parent)
    args[0] = shutil.which(args[0], path=bin_dir) or args[0]
    env = {**container_vars, "KUBECONFIG": str(kubeconfig),
           "POLLERFLEET_METRICS_PORT": str(free_port()),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(work),
           "PYTHONUNBUFFERED": "1"}  # as the image's ENV sets it
    log_file = work / "operator.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT)
    return Operator(proc, log_file, health_port, kubeconfig)
