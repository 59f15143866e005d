"""A node agent for the real control plane: what a kubelet does, with local processes.

The control plane in tests/support/control_plane.py has no scheduler and no kubelet, so pods
stay Pending. This agent:

- registers a Node and keeps its Ready condition fresh (the node lifecycle controller would
  otherwise taint it and evict its pods);
- binds the Pending pods it is given (a label selector) to that Node through the Binding
  subresource, as the scheduler does;
- runs each pod in a network namespace of its own (loopback, the pod's sysctls, a veth pair
  on 10.250.<n>.0/30 so that probes reach it), each container as a local process from the
  pod spec: `command` + `args` (the images have no entrypoint, so `args` alone is the
  command; `python` and other names resolve in this interpreter's bin folder first), env
  with `value`, `secretKeyRef` and `fieldRef`, HOSTNAME = the pod's hostname;
- runs the declared HTTP probes against the declared ports: readiness sets the container's
  and the pod's Ready, liveness failures restart the container; an exited container is
  restarted (restartPolicy Always) and its restartCount reported;
- on deletion, sends SIGTERM, waits the pod's grace period, SIGKILLs what is left, then
  deletes the pod for good (grace 0), as the kubelet does.

Limits (each named where a test relies on the opposite): no images (the processes run this
checkout's interpreter and packages); containers run as UID 0 with every capability dropped
and no new privileges, not as an arbitrary UID (this machine's interpreter lives under a
mode-700 /root), so file permissions are not what a cluster enforces; no resource limits,
volumes other than the host's /tmp, exec or TCP probes, init containers or service routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.control_plane import ADMIN_TOKEN, ControlPlane
from tests.support.k8s_deploy import container_env, expand, pod_fields, secrets_named
from tests.support.netns import veth_host

log = logging.getLogger("tests.node_agent")
BIN = str(Path(sys.executable).parent)
FIRST_SUBNET = 100  # 10.250.100.0/30 up: clear of the netns test hosts (10.250.1-99)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _sh(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {err.decode().strip()}")


@dataclass
class Container:
    spec: dict[str, Any]
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    started_at: str = ""
    log_path: Path | None = None


@dataclass
class RunningPod:
    """One pod's namespace, processes and probes."""

    agent: NodeAgent
    pod: dict[str, Any]
    subnet: int
    containers: dict[str, Container] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    reported: str = ""

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def netns(self) -> str:
        return f"scpod-{self.subnet}"

    @property
    def ip(self) -> str:
        return f"10.250.{self.subnet}.2"

    async def start(self) -> None:
        for cmd in veth_host(self.netns, self.subnet, 30, f"scp{self.subnet}o",
                             f"scp{self.subnet}i"):
            await _sh(*cmd)
        for sysctl in (self.pod["spec"].get("securityContext") or {}).get("sysctls", []):
            await _sh("ip", "netns", "exec", self.netns, "sysctl", "-q", "-w",
                      f"{sysctl['name']}={sysctl['value']}")
        for spec in self.pod["spec"]["containers"]:
            self.containers[spec["name"]] = Container(spec)
        for c in self.containers.values():
            await self._spawn(c)
            self.tasks.append(asyncio.create_task(self._supervise(c)))
        await self.report()

    async def _spawn(self, c: Container) -> None:
        argv = [*c.spec.get("command", []), *c.spec.get("args", [])]
        if not argv:
            raise ValueError(f"{self.name}/{c.spec['name']}: no command or args (this agent "
                             "runs no images, so it knows no entrypoint)")
        env = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp",
               "HOSTNAME": self.pod["spec"].get("hostname", self.name),
               "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1",  # the image's ENV
               **await self.agent.container_env(self.pod, c.spec)}
        argv = [expand(a, env) for a in argv]
        argv[0] = shutil.which(argv[0], path=BIN) or shutil.which(argv[0]) or argv[0]
        c.log_path = self.agent.logs / f"{self.name}-{c.spec['name']}-{c.restarts}.log"
        out = await asyncio.to_thread(open, c.log_path, "wb")
        with out:
            c.proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.netns,
                "setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                *argv, env=env, cwd="/tmp", stdout=out, stderr=asyncio.subprocess.STDOUT)
        c.started_at, c.ready = _now(), False

    async def _supervise(self, c: Container) -> None:
        """Probes on their periods; a restart when the process exits or liveness fails."""
        readiness, liveness = c.spec.get("readinessProbe"), c.spec.get("livenessProbe")
        period = min((p.get("periodSeconds", 10) for p in (readiness, liveness) if p),
                     default=1.0)
        period = min(period, 1.0)  # probe more often than declared: tests wait less
        live_failures = ready_failures = 0
        while True:
            assert c.proc is not None
            if c.proc.returncode is not None:
                c.restarts += 1
                await asyncio.sleep(1)  # the kubelet's back-off, shortened
                await self._spawn(c)
            if readiness:
                ok = await self._probe(c, readiness)
                ready_failures = 0 if ok else ready_failures + 1
                if ok:
                    c.ready = True
                elif ready_failures >= readiness.get("failureThreshold", 3):
                    c.ready = False
            else:
                c.ready = c.proc.returncode is None
            if liveness:
                ok = await self._probe(c, liveness)
                live_failures = 0 if ok else live_failures + 1
                if live_failures >= liveness.get("failureThreshold", 3):
                    await self._kill(c, grace=5.0)
                    live_failures = 0
            await self.report()
            await asyncio.sleep(period)

    async def _probe(self, c: Container, probe: dict[str, Any]) -> bool:
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c.spec.get("ports", [])
                        if p.get("name") == port)
        url = f"http://{self.ip}:{port}{get.get('path', '/')}"
        try:
            async with self.agent.http.get(url, timeout=aiohttp.ClientTimeout(
                    total=probe.get("timeoutSeconds", 1))) as resp:
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _kill(self, c: Container, grace: float) -> None:
        if c.proc is None or c.proc.returncode is not None:
            return
        c.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(c.proc.wait(), grace)
        except TimeoutError:
            c.proc.kill()
            await c.proc.wait()

    async def report(self) -> None:
        ready = all(c.ready for c in self.containers.values())
        statuses = [{"name": n, "ready": c.ready, "started": True, "restartCount": c.restarts,
                     "image": c.spec["image"], "imageID": "",
                     "containerID": f"local://{c.proc.pid if c.proc else 0}",
                     "state": {"running": {"startedAt": c.started_at}}}
                    for n, c in self.containers.items()]
        conds = [{"type": t, "status": "True" if ok else "False"}
                 for t, ok in (("PodScheduled", True), ("Initialized", True),
                               ("ContainersReady", ready), ("Ready", ready))]
        status = {"phase": "Running", "hostIP": "127.0.0.1", "podIP": self.ip,
                  "podIPs": [{"ip": self.ip}], "conditions": conds,
                  "containerStatuses": statuses}
        digest = json.dumps(status, sort_keys=True)
        if digest == self.reported:
            return
        now = _now()
        for cond in conds:
            cond["lastTransitionTime"] = now
        status["startTime"] = self.pod["metadata"].get("creationTimestamp", now)
        if await self.agent.patch_status(self.namespace, self.name, status):
            self.reported = digest
        self.agent.serving_changed()

    async def stop(self, grace: float) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(self._kill(c, grace) for c in self.containers.values()))
        with contextlib.suppress(RuntimeError):
            await _sh("ip", "link", "del", f"scp{self.subnet}o")
        with contextlib.suppress(RuntimeError):
            await _sh("ip", "netns", "del", self.netns)


class NodeAgent:
    """Runs the pods matching `selector` (a label selector) in namespace `namespace`."""

    def __init__(self, plane: ControlPlane, namespace: str, selector: str,
                 logs: Path, node: str = "test-node") -> None:
        self.plane, self.namespace, self.selector, self.logs = plane, namespace, selector, logs
        self.node = node
        self.pods: dict[str, RunningPod] = {}  # by uid
        self._stopping: set[str] = set()
        self._subnets = iter(range(FIRST_SUBNET, 250))
        self._free: list[int] = []
        # Called with True when a first pod becomes ready, False when none is left.
        self.on_serving: Callable[[bool], None] = lambda serving: None
        self._serving = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ssl = ssl.create_default_context(cafile=str(plane.ca_file))
        self.http = aiohttp.ClientSession()
        self.api = aiohttp.ClientSession(
            base_url=plane.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            connector=aiohttp.TCPConnector(ssl=self._ssl))

    # ---- the API ---------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        async with self.api.request(method, path, data=data, timeout=aiohttp.ClientTimeout(
                total=10), headers={"Content-Type": content_type}) as resp:
            return resp.status, await resp.json(content_type=None)

    async def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> bool:
        try:
            code, _ = await self._call(
                "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
                "application/strategic-merge-patch+json")
        except (aiohttp.ClientError, TimeoutError):
            return False
        return code == 200

    async def container_env(self, pod: dict[str, Any], spec: dict[str, Any]) -> dict[str, str]:
        meta = pod["metadata"]
        secrets = {}
        for name in secrets_named(spec):
            _, secret = await self._call(
                "GET", f"/api/v1/namespaces/{meta['namespace']}/secrets/{name}")
            secrets[name] = secret["data"]
        return container_env(spec, secrets, pod_fields(meta, self.node))

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node}},
                "status": {"capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
                           "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"}}}
        code, body = await self._call("POST", "/api/v1/nodes", node)
        assert code in (201, 409), body
        await self._heartbeat_once()
        self._tasks = [asyncio.create_task(self._heartbeats()),
                       asyncio.create_task(self._watch())]

    async def _heartbeat_once(self) -> None:
        now = _now()
        conds = [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "node agent", "lastHeartbeatTime": now,
                  "lastTransitionTime": now}]
        await self._call("PATCH", f"/api/v1/nodes/{self.node}/status",
                         {"status": {"conditions": conds}},
                         "application/strategic-merge-patch+json")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self._heartbeat_once()

    async def _watch(self) -> None:
        """List, then watch from the list's resourceVersion; on any break (the API server
        restarted, the watch expired) list again."""
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        while True:
            try:
                code, listed = await self._call("GET", f"{path}?labelSelector={self.selector}")
                if code != 200:
                    raise aiohttp.ClientError(f"list pods: {code}")
                for pod in listed["items"]:
                    await self._on_pod("ADDED", pod)
                rv = listed["metadata"]["resourceVersion"]
                url = (f"{path}?watch=1&labelSelector={self.selector}&resourceVersion={rv}"
                       "&allowWatchBookmarks=false")
                async with self.api.get(url, timeout=aiohttp.ClientTimeout(
                        total=None, sock_read=None)) as resp:
                    async for line in resp.content:
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            break
                        await self._on_pod(event["type"], event["object"])
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                log.info("node agent: watch broken (%s); listing again", exc)
            await asyncio.sleep(0.5)

    async def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if kind == "DELETED":
            await self._stop(uid, 0)
            return
        if not spec.get("nodeName"):
            await self._call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                             f"{meta['name']}/binding",
                             {"apiVersion": "v1", "kind": "Binding",
                              "metadata": {"name": meta["name"]},
                              "target": {"apiVersion": "v1", "kind": "Node",
                                         "name": self.node}})
            return
        if spec["nodeName"] != self.node:
            return
        if meta.get("deletionTimestamp"):
            if uid not in self._stopping:
                self._stopping.add(uid)
                grace = meta.get("deletionGracePeriodSeconds",
                                 spec.get("terminationGracePeriodSeconds", 30))
                task = asyncio.create_task(self._terminate(pod, float(grace)))
                self._tasks.append(task)
            return
        if uid not in self.pods:
            subnet = self._free.pop() if self._free else next(self._subnets)
            running = RunningPod(self, pod, subnet)
            self.pods[uid] = running
            await running.start()

    async def _stop(self, uid: str, grace: float) -> None:
        running = self.pods.pop(uid, None)
        if running is not None:
            self.serving_changed()
            await running.stop(grace)
            self._free.append(running.subnet)

    async def _terminate(self, pod: dict[str, Any], grace: float) -> None:
        meta = pod["metadata"]
        await self._stop(meta["uid"], grace)
        await self._call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                         f"{meta['name']}",
                         {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                          "preconditions": {"uid": meta["uid"]}})
        self._stopping.discard(meta["uid"])

    def serving_changed(self) -> None:
        serving = bool(self.ready_pods())
        if serving != self._serving:
            self._serving = serving
            self.on_serving(serving)

    def ready_pods(self) -> set[str]:
        return {p.name for p in self.pods.values()
                if all(c.ready for c in p.containers.values())}

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop(uid, 10) for uid in list(self.pods)))
        await self.http.close()
        await self.api.close()
