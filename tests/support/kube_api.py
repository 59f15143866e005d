"""The Kubernetes API for operator tests: kmock, plus what it lacks, plus kopf in a thread.

kmock 0.8 stores objects as plain JSON. A real API server also sets metadata.uid,
resourceVersion, generation and creationTimestamp, and names objects from generateName;
kopf needs them (owner references carry the owner's uid; observedGeneration follows
generation; events are created with generateName), so `FilledEmulator` adds them. Not
filled (and not relied on): label selectors, strategic merge (a plain merge here), PUT,
server-side apply, garbage collection of owned objects, schema validation — the CRD schema
is checked offline instead (tests/test_manifests.py).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
import kopf
from kmock._internal import enums

from poller.progress import Progress

_versions = itertools.count(1)


class FilledEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Notified after every request: tests await a state instead of polling for it.
        self.progress = Progress()
        self.handled = 0  # requests served

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
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
        self.handled += 1
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
