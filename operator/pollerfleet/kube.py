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

from .crd import GROUP, PLURAL, VERSION

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
    data: dict[str, Any] = json.loads(resp.data)
    return data


FIELD_MANAGER = "pollerfleet-operator"

_APPLY = {
    "StatefulSet": lambda a: client.AppsV1Api(a).patch_namespaced_stateful_set,
    "Service": lambda a: client.CoreV1Api(a).patch_namespaced_service,
    "PodDisruptionBudget": lambda a: client.PolicyV1Api(a).patch_namespaced_pod_disruption_budget,
}


def apply(obj: dict[str, Any]) -> None:
    """Server-side apply: create the object, or make it exactly what is given.

    A strategic-merge patch (the client's default for a dict) merges lists such as `env`
    and `containers` by name, so an entry the spec no longer has would stay. Applied with
    our field manager, fields this manager set before and no longer sets are removed.
    `force`: the operator owns these objects, the size included (a `kubectl scale` is
    undone at the next sync).
    """
    kind, meta = obj["kind"], obj["metadata"]
    _APPLY[kind](api())(meta["name"], meta["namespace"], obj, field_manager=FIELD_MANAGER,
                        force=True, _content_type="application/apply-patch+yaml",
                        _request_timeout=TIMEOUT_S)


def patch_fleet_status(namespace: str, name: str, changes: dict[str, Any]) -> None:
    """A JSON merge patch of the PollerFleet's status (custom resources take no strategic
    merge: the client's default content type for a dict would be refused)."""
    client.CustomObjectsApi(api()).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": changes},
        _content_type="application/merge-patch+json", _request_timeout=TIMEOUT_S)


def read_statefulset(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _json(client.AppsV1Api(api()).read_namespaced_stateful_set(
            name, namespace, _preload_content=False, _request_timeout=TIMEOUT_S))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


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
