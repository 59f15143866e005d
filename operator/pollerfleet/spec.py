"""The PollerFleet spec as plain data, checked beyond what the CRD schema can say.

The CRD's OpenAPI schema (crds/pollerfleet.yaml) catches types and ranges at admission;
this module re-checks everything (an emulated or older API server may not validate) and
the rules a schema cannot express well. A bad spec raises `SpecError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Poller settings a fleet may pass through `pollerEnv` (the database target, REPLICA_ID,
# REPLICA_COUNT and PORT are the operator's to set).
POLLER_ENV = frozenset({
    "POLL_INTERVAL_MS", "BATCH_FLUSH_INTERVAL_MS", "BATCH_SIZE", "CONCURRENCY",
    "PING_BACKEND", "ICMP_SOCKET", "PING_TIMEOUT_MS", "LATENCY_API_ROUTE", "LATENCY_API_GROUP",
    "MAX_BUFFERED_SAMPLES", "RETRY_MAX_BACKOFF_MS", "DB_TIMEOUT_MS", "SHUTDOWN_GRACE_MS",
    "DATABASE_PREPARED_STATEMENTS", "LOG_FORMAT", "LOG_LEVEL", "TARGET_DENY", "SYNC_PAGE_SIZE",
})


class SpecError(ValueError):
    """The spec cannot be acted on; the message starts with the field's path."""


@dataclass(frozen=True)
class DatabaseRef:
    secret_name: str
    database_url_key: str | None = None
    supabase_url_key: str | None = None
    service_role_key_key: str | None = None

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.database_url_key, self.supabase_url_key,
                            self.service_role_key_key) if k]


@dataclass(frozen=True)
class FleetSpec:
    image: str
    database: DatabaseRef
    jobs_per_replica: int = 500
    min_replicas: int = 1
    max_replicas: int = 10
    scale_down_stabilization_s: int = 300
    sync_interval_s: int = 30
    latency_api_url: str | None = None
    latency_sidecar: bool = False
    image_pull_policy: str = "IfNotPresent"
    poller_env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    sidecar_resources: dict[str, Any] = field(default_factory=dict)
    termination_grace_s: int = 30
    stale_window_s: int = 120
    failover_s: int = 15


def _int(spec: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"spec.{key}: must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"spec.{key}: must be at least {minimum}, got {value}")
    return value


def parse(spec: Mapping[str, Any]) -> FleetSpec:
    image = spec.get("image")
    if not isinstance(image, str) or not image:
        raise SpecError("spec.image: required")
    db = spec.get("database")
    if not isinstance(db, Mapping) or not db.get("secretName"):
        raise SpecError("spec.database.secretName: required")
    ref = DatabaseRef(str(db["secretName"]), db.get("databaseUrlKey"),
                      db.get("supabaseUrlKey"), db.get("serviceRoleKeyKey"))
    supabase = ref.supabase_url_key or ref.service_role_key_key
    if bool(ref.database_url_key) == bool(supabase):
        raise SpecError("spec.database: set databaseUrlKey, or supabaseUrlKey with "
                        "serviceRoleKeyKey (exactly one database target)")
    if supabase and not (ref.supabase_url_key and ref.service_role_key_key):
        raise SpecError("spec.database: supabaseUrlKey and serviceRoleKeyKey go together")
    lo = _int(spec, "minReplicas", 1, 0)
    hi = _int(spec, "maxReplicas", 10, 1)
    if lo > hi:
        raise SpecError(f"spec.minReplicas: {lo} is above spec.maxReplicas {hi}")
    env = dict(spec.get("pollerEnv") or {})
    unknown = sorted(set(env) - POLLER_ENV)
    if unknown:
        raise SpecError(f"spec.pollerEnv: not settable here: {', '.join(unknown)}")
    sidecar = bool(spec.get("latencySidecar", False))
    url = spec.get("latencyApiUrl")
    if sidecar and url:
        raise SpecError("spec.latencyApiUrl: leave it out with latencySidecar: true")
    if env.get("PING_BACKEND", "latency_api") == "latency_api" and not (sidecar or url):
        raise SpecError("spec.latencyApiUrl: required unless latencySidecar is true or "
                        "pollerEnv.PING_BACKEND is icmp")
    return FleetSpec(
        image=image,
        database=ref,
        jobs_per_replica=_int(spec, "jobsPerReplica", 500, 1),
        min_replicas=lo,
        max_replicas=hi,
        scale_down_stabilization_s=_int(spec, "scaleDownStabilizationSeconds", 300, 0),
        sync_interval_s=_int(spec, "syncIntervalSeconds", 30, 1),
        latency_api_url=url,
        latency_sidecar=sidecar,
        image_pull_policy=str(spec.get("imagePullPolicy", "IfNotPresent")),
        poller_env={k: str(v) for k, v in env.items()},
        resources=dict(spec.get("resources") or {}),
        sidecar_resources=dict(spec.get("sidecarResources") or {}),
        termination_grace_s=_int(spec, "terminationGracePeriodSeconds", 30, 5),
        stale_window_s=_int(spec, "staleJobsWindowSeconds", 120, 0),
        failover_s=_int(spec, "failoverTimeoutSeconds", 15, 1),
    )
