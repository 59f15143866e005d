"""The few Kubernetes API calls the operator makes, with the `kubernetes` client.

Calls are synchronous in the client library; handlers run them in a thread. Bodies and
answers are plain dicts (`_preload_content=False`), the same shape render.py produces.
Every call has a timeout.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

TIMEOUT_S = 10

_api: client.ApiClient | None = None


def configure(api_client: client.ApiClient | None) -> None:
    """Use this client (tests point one at the API emulation); None: load the default."""
    global _api
    _api = api_client


def api() -> client.ApiClient:
    global _api
    if _api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _api = client.ApiClient()
    return _api


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)  # type: ignore[no-any-return]


_CREATE = {
    "StatefulSet": lambda a: client.AppsV1Api(a).create_namespaced_stateful_set,
    "Service": lambda a: client.CoreV1Api(a).create_namespaced_service,
    "PodDisruptionBudget": lambda a: client.PolicyV1Api(a).create_namespaced_pod_disruption_budget,
}
_PATCH = {
    "StatefulSet": lambda a: client.AppsV1Api(a).patch_namespaced_stateful_set,
    "Service": lambda a: client.CoreV1Api(a).patch_namespaced_service,
    "PodDisruptionBudget": lambda a: client.PolicyV1Api(a).patch_namespaced_pod_disruption_budget,
}


def apply(obj: dict[str, Any]) -> str:
    """Create the object, or patch it to match when it exists. Returns what was done."""
    kind, meta = obj["kind"], obj["metadata"]
    try:
        _CREATE[kind](api())(meta["namespace"], obj, _request_timeout=TIMEOUT_S)
        return "created"
    except ApiException as exc:
        if exc.status != 409:
            raise
    _PATCH[kind](api())(meta["name"], meta["namespace"], obj, _request_timeout=TIMEOUT_S)
    return "patched"


def read_statefulset(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _json(client.AppsV1Api(api()).read_namespaced_stateful_set(
            name, namespace, _preload_content=False, _request_timeout=TIMEOUT_S))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def scale_statefulset(namespace: str, name: str, replicas: int) -> None:
    client.AppsV1Api(api()).patch_namespaced_stateful_set(
        name, namespace, {"spec": {"replicas": replicas}}, _request_timeout=TIMEOUT_S)


def secret_keys(namespace: str, name: str) -> set[str] | None:
    """The keys a Secret holds (never its values), or None when it does not exist."""
    try:
        secret = _json(client.CoreV1Api(api()).read_namespaced_secret(
            name, namespace, _preload_content=False, _request_timeout=TIMEOUT_S))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})
