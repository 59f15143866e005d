"""The PollerFleet spec as plain data, checked beyond what the CRD schema can say.

The CRD's OpenAPI schema (crds/pollerfleet.yaml) catches types and ranges at admission;
this module re-checks everything (an emulated or older API server may not validate) and
the rules a schema cannot express well. A bad spec raises `SpecError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from poller.settings import SMTP_TLS_MODES, Settings, smtp_auth_problem

# What the operator sets from the spec itself (the database from the Secret, the Latency API,
# notifications from spec.notifications and their Secret, the pod's identity and port):
# not settable through pollerEnv. Every other poller setting is, so a new setting needs no
# change here.
SET_BY_THE_OPERATOR = frozenset({
    "DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "LATENCY_API_URL", "PORT",
    "FLEET_NAME", "REPLICA_ID", "REPLICA_COUNT", "NOTIFY_APP_BASE_URL", "NOTIFY_MAIL_FROM",
    "NOTIFY_SMTP_HOST", "NOTIFY_SMTP_PORT", "NOTIFY_SMTP_TLS", "NOTIFY_SMTP_USERNAME",
    "NOTIFY_SMTP_PASSWORD", "NOTIFY_WEBHOOK_URL",
})
POLLER_ENV = frozenset(
    field.alias for field in Settings.model_fields.values() if field.alias
) - SET_BY_THE_OPERATOR


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
class SecretKey:
    secret_name: str
    key: str


@dataclass(frozen=True)
class EmailSpec:
    host: str
    sender: str
    # The poller's own defaults (NOTIFY_SMTP_PORT, NOTIFY_SMTP_TLS), so a fleet gets the same.
    port: int = Settings.model_fields["notify_smtp_port"].default
    tls: str = Settings.model_fields["notify_smtp_tls"].default
    username: SecretKey | None = None
    password: SecretKey | None = None


@dataclass(frozen=True)
class Notifications:
    """spec.notifications: where alerts and completion notices go
    (docs/alerts-and-notices.md); absent, nothing is sent."""

    app_base_url: str | None = None
    email: EmailSpec | None = None
    webhook_url: SecretKey | None = None


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
    notifications: Notifications = field(default_factory=Notifications)

    def secret_refs(self) -> list[tuple[str, str, list[str]]]:
        """(spec path, Secret name, keys it must hold) for every Secret the pods read."""
        refs: dict[tuple[str, str], list[str]] = {
            ("spec.database", self.database.secret_name): list(self.database.keys)}
        n = self.notifications
        for path, ref in (("spec.notifications.email", n.email.username if n.email else None),
                          ("spec.notifications.email", n.email.password if n.email else None),
                          ("spec.notifications.webhook", n.webhook_url)):
            if ref is not None:
                refs.setdefault((path, ref.secret_name), []).append(ref.key)
        return [(path, secret, keys) for (path, secret), keys in refs.items()]


def _int(spec: Mapping[str, Any], key: str, default: int, minimum: int,
         path: str = "spec") -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}: must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{path}.{key}: must be at least {minimum}, got {value}")
    return value


def _env_int(env: Mapping[str, Any], alias: str) -> int:
    """A poller setting from pollerEnv, else the poller's own default (poller.settings)."""
    (info,) = (f for f in Settings.model_fields.values() if f.alias == alias)
    raw = env.get(alias, info.default)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise SpecError(f"spec.pollerEnv.{alias}: must be an integer, got {raw!r}") from None


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
    lo = _int(spec, "minReplicas", FleetSpec.min_replicas, 0)
    hi = _int(spec, "maxReplicas", FleetSpec.max_replicas, 1)
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
    failover_s = _int(spec, "failoverTimeoutSeconds", FleetSpec.failover_s, 1)
    # A replica is live while it synced within the failover timeout, and it syncs every
    # POLL_INTERVAL_MS: a timeout shorter than two of those calls every replica silent
    # between its syncs, and the others take over its jobs back and forth.
    poll_ms = _env_int(env, "POLL_INTERVAL_MS")
    if failover_s * 1000 < 2 * poll_ms:
        raise SpecError(f"spec.failoverTimeoutSeconds: {failover_s} s is under twice the "
                        f"pollers' POLL_INTERVAL_MS ({poll_ms} ms): set it to at least "
                        f"{-(-2 * poll_ms // 1000)} s, or sync more often")
    return FleetSpec(
        notifications=_notifications(spec.get("notifications")),
        image=image,
        database=ref,
        jobs_per_replica=_int(spec, "jobsPerReplica", FleetSpec.jobs_per_replica, 1),
        min_replicas=lo,
        max_replicas=hi,
        scale_down_stabilization_s=_int(spec, "scaleDownStabilizationSeconds",
                                        FleetSpec.scale_down_stabilization_s, 0),
        sync_interval_s=_int(spec, "syncIntervalSeconds", FleetSpec.sync_interval_s, 1),
        latency_api_url=url,
        latency_sidecar=sidecar,
        image_pull_policy=str(spec.get("imagePullPolicy", FleetSpec.image_pull_policy)),
        poller_env={k: str(v) for k, v in env.items()},
        resources=dict(spec.get("resources") or {}),
        sidecar_resources=dict(spec.get("sidecarResources") or {}),
        termination_grace_s=_int(spec, "terminationGracePeriodSeconds",
                                 FleetSpec.termination_grace_s, 5),
        stale_window_s=_int(spec, "staleJobsWindowSeconds", FleetSpec.stale_window_s, 0),
        failover_s=failover_s,
    )


def _str(where: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
    value = where.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}.{key}: {'required' if value is None else 'must be a string'}")
    return value


def _secret_key(where: Mapping[str, Any], name_key: str, key_key: str,
                path: str) -> SecretKey | None:
    name = _str(where, name_key, path)
    key = _str(where, key_key, path)
    if (name is None) != (key is None):
        raise SpecError(f"{path}: {name_key} and {key_key} go together")
    return SecretKey(name, key) if name and key else None


def _notifications(raw: Any) -> Notifications:
    if raw is None:
        return Notifications()
    path = "spec.notifications"
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: must be an object")
    base = _str(raw, "appBaseUrl", path)
    if base is not None and not base.startswith(("http://", "https://")):
        raise SpecError(f"{path}.appBaseUrl: must be an http:// or https:// URL")
    email = None
    if (mail := raw.get("email")) is not None:
        if not isinstance(mail, Mapping):
            raise SpecError(f"{path}.email: must be an object")
        where = f"{path}.email"
        host = _str(mail, "host", where, required=True)
        sender = _str(mail, "from", where, required=True)
        if sender is None or "@" not in sender:
            raise SpecError(f"{where}.from: not an email address")
        tls = mail.get("tls", EmailSpec.tls)
        if tls not in SMTP_TLS_MODES:
            raise SpecError(f"{where}.tls: one of {', '.join(SMTP_TLS_MODES)}, got {tls!r}")
        port = _int(mail, "port", EmailSpec.port, 1, where)
        if port > 65535:
            raise SpecError(f"{where}.port: must be at most 65535, got {port}")
        user = _secret_key(mail, "secretName", "usernameKey", where)
        password = _secret_key(mail, "secretName", "passwordKey", where)
        problem = smtp_auth_problem(tls, user is not None, password is not None)
        if problem == "pair":
            raise SpecError(f"{where}: usernameKey and passwordKey go together")
        if problem == "cleartext":
            raise SpecError(f"{where}.tls: none would send the password in clear text")
        email = EmailSpec(str(host), sender, port, str(tls), user, password)
    webhook = None
    if (hook := raw.get("webhook")) is not None:
        if not isinstance(hook, Mapping):
            raise SpecError(f"{path}.webhook: must be an object")
        webhook = _secret_key(hook, "secretName", "urlKey", f"{path}.webhook")
        if webhook is None:
            raise SpecError(f"{path}.webhook: secretName and urlKey are required")
    return Notifications(base, email, webhook)
