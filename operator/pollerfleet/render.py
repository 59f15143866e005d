"""The objects a PollerFleet owns, rendered as plain dicts from plain data (no API calls).

StatefulSet (Parallel pod management, so a resize starts or stops pods all at once),
headless Service, PodDisruptionBudget (maxUnavailable 1). Pods run non-root with a
read-only root filesystem and no capabilities; ICMP works through ping sockets, allowed
by the namespaced "safe" sysctl `net.ipv4.ping_group_range`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .crd import GROUP
from .spec import FleetSpec

PORT = 3000
SIDECAR_PORT = 4402  # the ping API, on the pod's loopback only
SIDECAR_HEALTH_PORT = 4403  # /health alone, for the kubelet's probe of the pod IP
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
# The digest of what the operator last applied: it applies again only when this changes, so
# a quiet fleet costs no writes and values the API server normalises cause no churn.
APPLIED_HASH = f"{GROUP}/applied-hash"
# The size the operator last applied. The StatefulSet's own replicas can be changed behind
# its back (`kubectl scale`); this annotation cannot be by that, so the operator decides from
# its own size and puts the StatefulSet back.
APPLIED_REPLICAS = f"{GROUP}/replicas"


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "soundcheck-poller",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "pollerfleet-operator",
    }


def selector(name: str) -> dict[str, str]:
    return {k: v for k, v in labels(name).items() if k != "app.kubernetes.io/managed-by"}


def _secret_env(var: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def fleet_key(namespace: str, name: str) -> str:
    """The fleet's name in the database (topology, heartbeats)."""
    return f"{namespace}/{name}"


def poller_env(spec: FleetSpec, fleet: str) -> list[dict[str, Any]]:
    db = spec.database
    env: list[dict[str, Any]] = [
        # The pod's ordinal, which the StatefulSet controller puts in this label.
        {"name": "REPLICA_ID",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}},
        # The fleet size comes from the database with each sync (topology handover), so a
        # resize never changes the pod template and never restarts a pod.
        {"name": "FLEET_NAME", "value": fleet},
        {"name": "PORT", "value": str(PORT)},
        # Finish writing before the kubelet's SIGKILL.
        {"name": "SHUTDOWN_GRACE_MS", "value": str(max(1, spec.termination_grace_s - 5) * 1000)},
    ]
    if db.database_url_key:
        env.append(_secret_env("DATABASE_URL", db.secret_name, db.database_url_key))
    else:
        env.append(_secret_env("SUPABASE_URL", db.secret_name, db.supabase_url_key or ""))
        env.append(_secret_env("SUPABASE_SERVICE_ROLE_KEY", db.secret_name,
                               db.service_role_key_key or ""))
    url = f"http://127.0.0.1:{SIDECAR_PORT}" if spec.latency_sidecar else spec.latency_api_url
    if url:
        env.append({"name": "LATENCY_API_URL", "value": url})
    env.extend(notification_env(spec))
    env.extend({"name": k, "value": v} for k, v in sorted(spec.poller_env.items())
               if k != "SHUTDOWN_GRACE_MS")
    return env


def notification_env(spec: FleetSpec) -> list[dict[str, Any]]:
    """spec.notifications as the poller's NOTIFY_* settings; credentials and the webhook
    URL (which often holds a token) come from Secrets, never from the spec."""
    n = spec.notifications
    env: list[dict[str, Any]] = []
    if n.app_base_url:
        env.append({"name": "NOTIFY_APP_BASE_URL", "value": n.app_base_url})
    if n.email is not None:
        e = n.email
        env += [{"name": "NOTIFY_SMTP_HOST", "value": e.host},
                {"name": "NOTIFY_SMTP_PORT", "value": str(e.port)},
                {"name": "NOTIFY_SMTP_TLS", "value": e.tls},
                {"name": "NOTIFY_MAIL_FROM", "value": e.sender}]
        if e.username is not None and e.password is not None:
            env += [_secret_env("NOTIFY_SMTP_USERNAME", e.username.secret_name, e.username.key),
                    _secret_env("NOTIFY_SMTP_PASSWORD", e.password.secret_name, e.password.key)]
    if n.webhook_url is not None:
        env.append(_secret_env("NOTIFY_WEBHOOK_URL", n.webhook_url.secret_name,
                               n.webhook_url.key))
    return env


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "timeoutSeconds": 3, "failureThreshold": failures}


def pod_template(name: str, namespace: str, spec: FleetSpec) -> dict[str, Any]:
    poller = {
        "name": "poller",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": ["python", "-m", "poller"],
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": poller_env(spec, fleet_key(namespace, name)),
        "livenessProbe": _probe("/health", "http", 10, 3),
        "readinessProbe": _probe("/ready", "http", 5, 2),
        "securityContext": _security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "resources": spec.resources,
    }
    containers = [poller]
    sidecar_env = [{"name": "ICMP_SOCKET", "value": "dgram"}]
    if "TARGET_DENY" in spec.poller_env:  # the sidecar refuses what the poller refuses
        sidecar_env.append({"name": "TARGET_DENY", "value": spec.poller_env["TARGET_DENY"]})
    if spec.latency_sidecar:
        containers.append({
            "name": "latency-sidecar",
            "image": spec.image,
            "imagePullPolicy": spec.image_pull_policy,
            # The ping API answers anyone who reaches it: loopback only, so only the poller
            # in the same pod can.
            "args": ["python", "-m", "poller.sidecar", "--host", "127.0.0.1",
                     "--port", str(SIDECAR_PORT), "--health-port", str(SIDECAR_HEALTH_PORT)],
            "ports": [{"name": "latency-health", "containerPort": SIDECAR_HEALTH_PORT}],
            "env": sidecar_env,
            "livenessProbe": _probe("/health", "latency-health", 10, 3),
            "securityContext": _security(),
            "resources": spec.sidecar_resources,
        })
    return {
        "metadata": {"labels": selector(name)},
        "spec": {
            "terminationGracePeriodSeconds": spec.termination_grace_s,
            # Pollers never call the Kubernetes API: no token in the pod to steal.
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.ping_group_range", "value": "0 2147483647"}],
            },
            "containers": containers,
            "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
        },
    }


def statefulset(name: str, namespace: str, spec: FleetSpec, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name),
                     "annotations": {APPLIED_REPLICAS: str(replicas)}},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(name)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": pod_template(name, namespace, spec),
        },
    }


def service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "clusterIP": "None",
            "selector": selector(name),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
        },
    }


def pdb(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of `obj` carrying the digest of its own content in an annotation."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    out = copy.deepcopy(obj)
    out["metadata"].setdefault("annotations", {})[APPLIED_HASH] = digest
    return out


def applied_replicas(sts: dict[str, Any] | None) -> int:
    """The size the operator last applied to this StatefulSet; its live replicas when it
    carries none (made by an older operator), 0 when there is no StatefulSet."""
    if sts is None:
        return 0
    marked = (sts["metadata"].get("annotations") or {}).get(APPLIED_REPLICAS)
    return int(marked) if marked is not None else int(sts["spec"].get("replicas", 0))


def applied_hash(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata", {}).get("annotations") or {}).get(APPLIED_HASH)
