"""The Kubernetes API for operator tests: kmock, plus what it lacks, plus kopf in a thread.

kmock 0.8 stores objects as plain JSON. A real API server also sets metadata.uid,
resourceVersion, generation and creationTimestamp, and names objects from generateName;
kopf needs them (owner references carry the owner's uid; observedGeneration follows
generation; events are created with generateName), so `FilledEmulator` adds them. It also
patches as the API server does (tests/support/k8s_patch.py): a dict from the `kubernetes`
client is a strategic merge (keyed lists merged, so an `env` entry left out stays), and
server-side apply (`application/apply-patch+yaml` with a `fieldManager`, creating the object
if absent) removes what the manager no longer sets. Not filled (and not relied on): label
selectors, PUT, garbage collection of owned objects, schema validation — the CRD schema is
checked offline instead (tests/test_manifests.py).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
import kopf
from kmock._internal import enums
from kubernetes import client as kc
from pollerfleet import kube
from pollerfleet.crd import GROUP, PLURAL, VERSION

from poller.progress import Progress
from tests.support.k8s_patch import server_side_apply, strategic_merge

_versions = itertools.count(1)


class FilledEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Notified after every request: tests await a state instead of polling for it.
        self.progress = Progress()
        self.log: list[tuple[str, str]] = []  # (method, path) of every request served
        # (resource, namespace, name, field manager) → what that manager applied last.
        self.applied: dict[tuple[Any, ...], dict[str, Any]] = {}

    def _as_api_server(self, request: Any) -> Any:
        """A strategic-merge or apply PATCH, turned into what kmock serves exactly: a JSON
        patch of the resulting top-level fields, or a create."""
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        if request.action != enums.action.UPDATE or request.name is None or ctype not in (
                "application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            return request
        key = (request.resource, request.namespace, request.name)
        exists = key in self.objects and not self.objects[key].deleted
        current = copy.deepcopy(self.objects[key].raw) if exists else None
        if ctype == "application/apply-patch+yaml":
            manager = request.params.get("fieldManager")
            if not manager:
                raise ValueError("fieldManager is required for apply patch")
            merged = server_side_apply(current or {}, request.data,
                                       self.applied.get((*key, manager)))
            self.applied[(*key, manager)] = copy.deepcopy(request.data)
            if current is None:
                # As a create: kmock serves creates on the collection (no name).
                return _rewrite(request, action=enums.action.CREATE, name=None,
                                method=enums.method.POST, data=merged)
        elif current is None:
            return request  # kmock answers 404, as the API server does
        else:
            merged = strategic_merge(current, request.data)
        ops: list[dict[str, Any]] = [{"op": "add", "path": f"/{k}", "value": v}
                                     for k, v in merged.items() if current.get(k) != v]
        ops += [{"op": "remove", "path": f"/{k}"} for k in current if k not in merged]
        if current.get("spec") != merged.get("spec") and request.subresource is None:
            generation = current.get("metadata", {}).get("generation", 1) + 1
            ops.append({"op": "add", "path": "/metadata/generation", "value": generation})
        return _rewrite(request, data=ops)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        self.log.append((str(request.method.value).upper(), str(request.url.path)))
        try:
            request = self._as_api_server(request)
        except ValueError as exc:
            return aiohttp.web.json_response(status=400, data={
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 400,
                "reason": "BadRequest", "message": str(exc)})
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp",
                                datetime.now(UTC).isoformat().replace("+00:00", "Z"))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(_versions))
            elif request.action == enums.action.UPDATE and request.name is not None:
                meta["resourceVersion"] = str(next(_versions))
                if "spec" in data and request.subresource is None:
                    key = (request.resource, request.namespace, request.name)
                    current = self.objects[key].raw if key in self.objects else {}
                    gen = current.get("metadata", {}).get("generation", 1)
                    meta["generation"] = gen + 1
        if request.action == enums.action.UPDATE and isinstance(data, list):
            data.append({"op": "replace", "path": "/metadata/resourceVersion",
                         "value": str(next(_versions))})
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed:
            # A stale resourceVersion in a JSON patch "test": the API server answers 422,
            # which kopf takes as "newer changes pending, patch again on the next cycle".
            return aiohttp.web.json_response(status=422, data={
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 422,
                "reason": "Invalid", "message": "the resourceVersion test failed"})
        finally:
            self.progress.notify()


def _rewrite(request: Any, **fields: Any) -> Any:
    """Change a (frozen) kmock request in place: kmock finds the reaction for a request by
    its identity among the requests it recorded, so a copy would match nothing."""
    for name, value in fields.items():
        object.__setattr__(request, name, value)
    return request


_target: dict[str, Any] = {}


def _login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_target["url"], insecure=True)


class OperatorThread:
    """kopf with the pollerfleet handlers, in a thread with its own event loop."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kopf", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        import pollerfleet  # noqa: F401  (registers the handlers)

        registry = kopf.get_default_registry()
        _target["url"] = self.url
        if not _target.get("login"):
            _target["login"] = True
            kopf.on.login(registry=registry)(_login)
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        settings.watching.reconnect_backoff = 0.1
        try:
            asyncio.run(kopf.operator(
                registry=registry, settings=settings, namespaces=[self.namespace],
                stop_flag=self._stop, ready_flag=self._ready, standalone=True))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("kopf did not become ready")

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)


NS = "default"
FLEETS = kmock.resource(GROUP, VERSION, PLURAL)
STS = kmock.resource("apps", "v1", "statefulsets")
SVC = kmock.resource("", "v1", "services")
PDB = kmock.resource("policy", "v1", "poddisruptionbudgets")
EVENTS = kmock.resource("", "v1", "events")


class Cluster:
    def __init__(self, emu: FilledEmulator, server: kmock.Server) -> None:
        self.emu = emu
        self.server = server
        self.namespace = NS
        self.operator: OperatorThread
        self.url = str(server.url).rstrip("/")

    def get(self, resource: Any, name: str) -> dict[str, Any] | None:
        key = (resource, NS, name)
        if key not in self.emu.objects or self.emu.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.emu.objects[key].raw
        return raw

    def existing(self, resource: Any, name: str) -> dict[str, Any]:
        """The object, which must exist."""
        found = self.get(resource, name)
        assert found is not None, f"no {name} of {resource}"
        return found

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

    async def start_operator(self) -> None:
        self.operator = OperatorThread(self.url, self.namespace)
        await asyncio.to_thread(self.operator.start)

    async def stop_operator(self) -> None:
        """Stop kopf, as a crash or a rollout of the operator would."""
        await asyncio.to_thread(self.operator.stop)
        if self.operator.error is not None:
            raise self.operator.error

    async def set_statefulset_status(self, name: str, replicas: int, ready: int) -> None:
        """What the StatefulSet controller would report (none runs here)."""
        await self.patch(f"/apis/apps/v1/namespaces/{NS}/statefulsets/{name}/status",
                         {"status": {"replicas": replicas, "readyReplicas": ready}})

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.emu.log

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [obj.raw for key, obj in self.emu.objects.items()
                if key[0] == EVENTS and not obj.deleted and obj.raw.get("reason") == reason]

    def fleet_status(self, name: str) -> dict[str, Any]:
        return (self.get(FLEETS, name) or {}).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions: list[dict[str, Any]] = self.fleet_status(name).get("conditions", [])
        return next((c for c in conditions if c["type"] == kind), {})

    def replicas_history(self, name: str) -> list[int]:
        """Every spec.replicas the StatefulSet has had, in order (repeats collapsed)."""
        key = (STS, NS, name)
        if key not in self.emu.objects:
            return []
        values = [v.raw["spec"]["replicas"] for v in self.emu.objects[key].history.raw
                  if v is not None]
        return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]

    def replicas(self, name: str) -> int | None:
        sts = self.get(STS, name)
        return None if sts is None else sts["spec"]["replicas"]


@asynccontextmanager
async def running_operator(dsn: str) -> AsyncIterator[Cluster]:
    """kmock serving the API, a Secret with the database URL, the operator running.

    The operator reads the load with DATABASE_URL from the environment: set it first.
    """
    async with FilledEmulator() as emu, kmock.Server(emu) as server:
        emu.resources.load_bundled()
        fleets: kmock.ResourceDict = {
            "kind": "PollerFleet", "namespaced": True, "singular": "pollerfleet",
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            "subresources": ["status"], "shortnames": [], "categories": []}
        emu.resources[FLEETS] = fleets
        c = Cluster(emu, server)
        kube.configure(kc.ApiClient(kc.Configuration(host=c.url)))
        c.namespace = NS
        await c.post(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "soundcheck-db"},
            "data": {"database-url": base64.b64encode(dsn.encode()).decode()}})
        await c.start_operator()
        try:
            yield c
        finally:
            await c.stop_operator()
            kube.configure(None)


class FakePods:
    """Plays the StatefulSet controller and the pollers' heartbeats, for operator tests
    that need no real pods: a StatefulSet's pods are ready as soon as it asks for them,
    and each "pod" syncs with the fleet's topology (a heartbeat through the SQL API)."""

    def __init__(self, cluster: Cluster, conn: Any, name: str) -> None:
        # `conn` must be this object's own: asyncpg runs one query at a time per connection.
        self.cluster, self.conn, self.name = cluster, conn, name
        self._last: tuple[int, int] | None = None

    async def run(self) -> None:
        while True:
            await self.step()
            await self.cluster.emu.progress.next()

    async def step(self) -> None:
        sts = self.cluster.get(STS, self.name)
        if sts is None:
            return
        pods = int(sts["spec"]["replicas"])
        if (sts.get("status") or {}).get("readyReplicas") != pods:
            await self.cluster.set_statefulset_status(self.name, pods, pods)
        fleet = f"{NS}/{self.name}"
        row = await self.conn.fetchrow(
            "select epoch, counts from poller_topology where fleet = $1", fleet)
        epoch = row["epoch"] if row else 0
        if (pods, epoch) != self._last and epoch:
            # A fake pod takes a topology up at once: it reports the epoch as applied.
            for replica in range(pods):
                await self.conn.fetchval(
                    "select poller_fleet_sync_live($1, $2, $3, $4, now(), false, 0, 'fake', 1)",
                    fleet, replica, epoch, row["counts"])
            self._last = (pods, epoch)
