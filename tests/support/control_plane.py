"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The binaries come, in this order, from `KUBEBUILDER_ASSETS` (envtest's convention: a folder
with `etcd` and `kube-apiserver`, and `kube-controller-manager` if it has one) or from the
xz-packed v1.36.2 binaries in `../shared/k8s/bin` beside this repository (or
`SOUNDCHECK_K8S_DIR`). `find_binaries()` says why when there are none, so tests skip with the
reason.

The servers are started here rather than by `shared/k8s/start.sh` so that both sources get the
same flags, free ports (several planes may run at once) and a throwaway folder. The flags are
start.sh's: token authentication, RBAC, service-account tokens, the default admission plugins
(PodSecurity included), the real controllers. No scheduler and no kubelet: pods stay Pending
until a node agent binds and runs them (tests/support/node_agent.py).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import lzma
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from poller.localpg import free_port

ROOT = Path(__file__).resolve().parents[2]
SHARED_K8S = Path(os.environ.get("SOUNDCHECK_K8S_DIR", ROOT.parent / "shared" / "k8s"))
ADMIN_TOKEN = "soundcheck-admin-token"
KCM_TOKEN = "soundcheck-kcm-token"
_CACHE = Path(tempfile.gettempdir()) / "soundcheck-k8s-bin"
_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")


def find_binaries() -> tuple[dict[str, Path], str]:
    """The binaries' paths (kube-controller-manager may be absent), or {} and why not."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found = {b: Path(assets) / b for b in _BINARIES if (Path(assets) / b).is_file()}
        if {"etcd", "kube-apiserver"} <= found.keys():
            return found, ""
        return {}, f"KUBEBUILDER_ASSETS={assets} has no etcd and kube-apiserver"
    packed = {b: SHARED_K8S / "bin" / f"{b}.xz" for b in _BINARIES}
    if not all(p.is_file() for p in packed.values()):
        return {}, (f"no Kubernetes control plane: set KUBEBUILDER_ASSETS or provide "
                    f"{SHARED_K8S}/bin/*.xz")
    _CACHE.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, xz in packed.items():
        out = _CACHE / name
        # Unpacked once per machine; a changed archive (size or time) is unpacked again.
        stamp = _CACHE / f"{name}.stamp"
        key = f"{xz.stat().st_size}:{xz.stat().st_mtime_ns}"
        if not out.exists() or not stamp.exists() or stamp.read_text() != key:
            tmp = out.with_suffix(".tmp")
            with lzma.open(xz) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.chmod(0o755)
            tmp.replace(out)
            stamp.write_text(key)
        found[name] = out
    return found, ""


@dataclass
class ControlPlane:
    binaries: dict[str, Path]
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sc-k8s-")))
    api_port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    kcm_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_file(self) -> Path:
        return self.home / "pki" / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """Admin (system:masters): for the tests' own setup and checks, never the operator."""
        return self.home / "kubeconfig"

    @property
    def has_controllers(self) -> bool:
        return "kube-controller-manager" in self.binaries

    def write_kubeconfig(self, path: Path, user: str, token: str,
                         namespace: str | None = None) -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        ns = f", namespace: {namespace}" if namespace else ""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: test\n  cluster:\n    server: {self.url}\n"
            f"    certificate-authority-data: {ca}\n"
            f"users:\n- name: {user}\n  user:\n    token: {token}\n"
            f"contexts:\n- name: test\n  context: {{cluster: test, user: {user}{ns}}}\n"
            "current-context: test\n")
        return path

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._pki()
        self.write_kubeconfig(self.kubeconfig, "admin", ADMIN_TOKEN)
        self.write_kubeconfig(self.home / "kcm.kubeconfig", "system:kube-controller-manager",
                              KCM_TOKEN)
        (self.home / "logs").mkdir(exist_ok=True)
        client, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.etcd_peer_port}"
        args = ["--data-dir", str(self.home / "etcd"), "--listen-client-urls", client,
                "--listen-peer-urls", peer, "--unsafe-no-fsync", "--log-level=error"]
        help_text = subprocess.run([str(self.binaries["etcd"]), "--help"], capture_output=True,
                                   text=True, timeout=10).stdout
        if "advertise-client-urls" in help_text:  # the full etcd (envtest's) wants these too
            args += ["--advertise-client-urls", client, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", f"default={peer}"]
        self._spawn("etcd", args)
        self._wait_http(f"http://127.0.0.1:{self.etcd_port}/health", "etcd", 15)
        self.start_apiserver()
        if self.has_controllers:
            self._spawn("kube-controller-manager", [
                f"--kubeconfig={self.home / 'kcm.kubeconfig'}",
                f"--authentication-kubeconfig={self.home / 'kcm.kubeconfig'}",
                f"--authorization-kubeconfig={self.home / 'kcm.kubeconfig'}",
                "--bind-address=127.0.0.1", f"--secure-port={self.kcm_port}",
                f"--cert-dir={self.home / 'kcm-certs'}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.home / 'pki' / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--cluster-signing-cert-file={self.ca_file}",
                f"--cluster-signing-key-file={self.home / 'pki' / 'ca.key'}",
                "--service-cluster-ip-range=10.0.0.0/24", "--profiling=false",
                # Pods that a node agent stopped are gone at once, not after a minute.
                "--terminated-pod-gc-threshold=1"])
            self._wait_http(f"https://127.0.0.1:{self.kcm_port}/healthz",
                            "kube-controller-manager", 30, verify=False)

    def start_apiserver(self) -> None:
        pki = self.home / "pki"
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--cert-dir={self.home / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            "--endpoint-reconciler-type=none", "--profiling=false"])
        self._wait_http(f"{self.url}/readyz", "kube-apiserver", 60, token=ADMIN_TOKEN)

    def stop_apiserver(self) -> None:
        self._terminate("kube-apiserver")

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self._terminate(name)
        shutil.rmtree(self.home, ignore_errors=True)

    def log(self, name: str) -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    # ---- helpers ---------------------------------------------------------------------
    def _pki(self) -> None:
        pki = self.home / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        ca.private_key_pem.write_to_path(str(pki / "ca.key"))
        server = ca.issue_cert("127.0.0.1", "localhost", "kubernetes.default.svc", "10.0.0.1",
                               not_after=datetime.datetime.now(datetime.UTC)
                               + datetime.timedelta(days=2))
        server.cert_chain_pems[0].write_to_path(str(pki / "apiserver.crt"))
        server.private_key_pem.write_to_path(str(pki / "apiserver.key"))
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(sa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (pki / "sa.pub").write_bytes(sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (pki / "tokens.csv").write_text(
            f'{ADMIN_TOKEN},admin,uid-admin,"system:masters"\n'
            f"{KCM_TOKEN},system:kube-controller-manager,uid-kcm\n")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child's
        with log:
            self.procs[name] = subprocess.Popen([str(self.binaries[name]), *args],
                                                stdout=log, stderr=subprocess.STDOUT)

    def _terminate(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _wait_http(self, url: str, name: str, timeout: float, *, token: str | None = None,
                   verify: bool = True) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file)) if verify else \
            ssl._create_unverified_context()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: a server that never comes up fails
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.log(name)[-3000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.05)
        raise TimeoutError(f"{name} not ready after {timeout} s:\n{self.log(name)[-3000:]}")
