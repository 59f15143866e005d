"""The poller's one settings object, read from environment variables.

Names and defaults of the original service are kept (PORT, SUPABASE_URL, ...). Settings
are validated by pydantic from one explicit mapping (the process environment by default) so
tests can pass their own; a bad value becomes `ConfigError`, which the entry point turns
into exit code 2 and one line naming the variable. Secrets are `SecretStr` and their values
are never echoed in an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .models import LatencyRoute
from .partition import ordinal_from_hostname
from .targets import DEFAULT_DENY, parse_networks

SmtpTls = Literal["starttls", "tls", "none"]
SMTP_TLS_MODES: tuple[str, ...] = get_args(SmtpTls)
SECRET_VARS = frozenset({"DATABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "NOTIFY_SMTP_PASSWORD",
                         "NOTIFY_WEBHOOK_URL"})


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable and never a secret."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # Database target: exactly one of DATABASE_URL or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY.
    database_url: SecretStr | None = Field(None, alias="DATABASE_URL")
    supabase_url: str | None = Field(None, alias="SUPABASE_URL")
    supabase_service_role_key: SecretStr | None = Field(None, alias="SUPABASE_SERVICE_ROLE_KEY")
    db_timeout_ms: int = Field(10_000, ge=100, alias="DB_TIMEOUT_MS")
    # Named prepared statements save a round trip per call but break transaction-mode
    # poolers that do not track them: off by default, on for direct connections.
    database_prepared_statements: bool = Field(False, alias="DATABASE_PREPARED_STATEMENTS")

    # Probes and metrics.
    port: int = Field(3000, ge=1, le=65535, alias="PORT")

    # Pinging.
    ping_backend: Literal["latency_api", "icmp"] = Field("latency_api", alias="PING_BACKEND")
    icmp_socket: Literal["auto", "dgram", "raw"] = Field("auto", alias="ICMP_SOCKET")
    latency_api_url: str = Field("http://localhost:4402", alias="LATENCY_API_URL")
    latency_api_route: LatencyRoute = Field("latency", alias="LATENCY_API_ROUTE")
    latency_api_group: str = Field("Sound Check", min_length=1, alias="LATENCY_API_GROUP")
    ping_timeout_ms: int = Field(10_000, ge=100, alias="PING_TIMEOUT_MS")
    concurrency: int = Field(50, ge=1, le=100_000, alias="CONCURRENCY")
    # Networks no job may target (docs/architecture.md, "Targets"); `none` allows every address.
    target_deny: str = Field(",".join(DEFAULT_DENY), alias="TARGET_DENY")

    # Sync, batching, buffering.
    poll_interval_ms: int = Field(5_000, ge=100, alias="POLL_INTERVAL_MS")
    batch_flush_interval_ms: int = Field(2_000, ge=10, alias="BATCH_FLUSH_INTERVAL_MS")
    batch_size: int = Field(100, ge=1, le=50_000, alias="BATCH_SIZE")
    # Jobs per page of a full read, and the most changes one sync takes up (each page is
    # one call and one JSON value). Smaller pages keep the event loop's stalls short.
    sync_page_size: int = Field(5_000, ge=1, le=50_000, alias="SYNC_PAGE_SIZE")
    # Syncs read only what changed; a full read of the owned jobs happens at start, when the
    # topology or live set moves, and at least this often
    # (docs/architecture.md, "Incremental sync").
    sync_full_interval_s: int = Field(3600, ge=10, le=43_200, alias="SYNC_FULL_INTERVAL_S")
    max_buffered_samples: int = Field(200_000, ge=1, alias="MAX_BUFFERED_SAMPLES")
    retry_max_backoff_ms: int = Field(30_000, ge=100, alias="RETRY_MAX_BACKOFF_MS")

    # Partitioning (static mode). REPLICA_ID falls back to the HOSTNAME ordinal, then 0.
    replica_count: int = Field(1, ge=1, le=1024, alias="REPLICA_COUNT")
    # Set by the operator: the fleet's topology (active replica counts) comes from the
    # database with each sync, and REPLICA_COUNT is not used.
    fleet_name: str | None = Field(None, min_length=1, max_length=253, alias="FLEET_NAME")
    replica_id: int = Field(0, ge=0, alias="REPLICA_ID")

    # Alerts (docs/alerts-and-notices.md, "Gaps"): how long a hole in a job's samples waits
    # for a late sample before it counts as a gap.
    alert_settle_s: int = Field(60, ge=0, le=86_400, alias="ALERT_SETTLE_S")

    # Delivery of alerts and completion notices: off unless a channel is configured.
    # Email over SMTP (NOTIFY_SMTP_HOST turns it on) and/or a webhook (JSON POST).
    notify_smtp_host: str | None = Field(None, min_length=1, alias="NOTIFY_SMTP_HOST")
    notify_smtp_port: int = Field(587, ge=1, le=65535, alias="NOTIFY_SMTP_PORT")
    # starttls: upgrade a plain connection (port 587); tls: TLS from the start (465); none:
    # plain text, for a relay on the same host or network only.
    notify_smtp_tls: SmtpTls = Field("starttls", alias="NOTIFY_SMTP_TLS")
    # A CA bundle (PEM) to trust for the SMTP server's certificate, e.g. an internal relay's.
    notify_smtp_ca_file: str | None = Field(None, min_length=1, alias="NOTIFY_SMTP_CA_FILE")
    notify_smtp_username: str | None = Field(None, min_length=1, alias="NOTIFY_SMTP_USERNAME")
    notify_smtp_password: SecretStr | None = Field(None, alias="NOTIFY_SMTP_PASSWORD")
    notify_mail_from: str | None = Field(None, min_length=3, alias="NOTIFY_MAIL_FROM")
    # A webhook URL often carries its token (chat incoming hooks): a secret.
    notify_webhook_url: SecretStr | None = Field(None, alias="NOTIFY_WEBHOOK_URL")
    # The app's address, for the link to the job in every message.
    notify_app_base_url: str | None = Field(None, alias="NOTIFY_APP_BASE_URL")
    notify_interval_ms: int = Field(2_000, ge=50, alias="NOTIFY_INTERVAL_MS")
    notify_timeout_ms: int = Field(15_000, ge=100, le=120_000, alias="NOTIFY_TIMEOUT_MS")
    notify_max_attempts: int = Field(8, ge=1, le=100, alias="NOTIFY_MAX_ATTEMPTS")
    notify_retry_max_backoff_ms: int = Field(600_000, ge=100,
                                             alias="NOTIFY_RETRY_MAX_BACKOFF_MS")

    # Lifecycle and logs.
    shutdown_grace_ms: int = Field(25_000, ge=0, alias="SHUTDOWN_GRACE_MS")
    log_format: Literal["text", "json"] = Field("text", alias="LOG_FORMAT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="LOG_LEVEL")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        has_pg = self.database_url is not None
        has_sb = self.supabase_url is not None or self.supabase_service_role_key is not None
        if has_pg and has_sb:
            raise ValueError(
                "DATABASE_URL: set either DATABASE_URL or SUPABASE_URL with "
                "SUPABASE_SERVICE_ROLE_KEY, not both"
            )
        if not has_pg and not has_sb:
            raise ValueError(
                "DATABASE_URL: no database target; set DATABASE_URL, or SUPABASE_URL with "
                "SUPABASE_SERVICE_ROLE_KEY"
            )
        if self.database_url is not None and has_pg:
            _check_database_url(self.database_url.get_secret_value())
        if has_sb:
            if not self.supabase_url:
                raise ValueError("SUPABASE_URL: required with SUPABASE_SERVICE_ROLE_KEY")
            if not self.supabase_service_role_key:
                raise ValueError("SUPABASE_SERVICE_ROLE_KEY: required with SUPABASE_URL")
            _check_http_url("SUPABASE_URL", self.supabase_url)
        _check_http_url("LATENCY_API_URL", self.latency_api_url)
        try:
            parse_networks(self.target_deny)
        except ValueError as exc:
            raise ValueError(f"TARGET_DENY: {exc}") from None
        _check_notify(self)
        if self.fleet_name is None and self.replica_id >= self.replica_count:
            raise ValueError(
                f"REPLICA_ID: {self.replica_id} is not below REPLICA_COUNT={self.replica_count}"
            )
        return self

    @property
    def notify_channels(self) -> tuple[str, ...]:
        """The delivery channels configured (none: notices stay in the outbox)."""
        return tuple(name for name, on in (("email", self.notify_smtp_host is not None),
                                           ("webhook", self.notify_webhook_url is not None))
                     if on)

    @property
    def transport(self) -> Literal["postgres", "supabase"]:
        return "postgres" if self.database_url is not None else "supabase"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        names = {f.alias for f in cls.model_fields.values() if f.alias}
        values: dict[str, str] = {k: v for k, v in env.items() if k in names and v != ""}
        ordinal = ordinal_from_hostname(env.get("HOSTNAME", ""))
        if "REPLICA_ID" not in values and ordinal is not None:
            values["REPLICA_ID"] = str(ordinal)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None


def _check_database_url(dsn: str) -> None:
    """What would otherwise fail only at the first connection, named without the value."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("DATABASE_URL: must start with postgresql:// or postgres://")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in 0..65535
    except ValueError:
        raise ValueError("DATABASE_URL: the port is not a number from 1 to 65535") from None
    if parts.port == 0:
        raise ValueError("DATABASE_URL: the port is not a number from 1 to 65535")
    # Several hosts (host1:5432,host2:5433) are allowed; each port must be a number.
    for hostport in parts.netloc.rpartition("@")[2].split(","):
        port = hostport.rpartition("]")[2].rpartition(":")[2] if ":" in hostport else ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("DATABASE_URL: the port is not a number from 1 to 65535")


def smtp_auth_problem(tls: str, has_username: bool, has_password: bool) -> str | None:
    """The SMTP authentication rules, written once: the poller checks its environment with
    them and the operator a fleet's spec.notifications.email, each naming its own fields.
    Which rule is broken: "pair" (a username without a password or the reverse),
    "cleartext" (a password without TLS), or None."""
    if has_username != has_password:
        return "pair"
    if has_password and tls == "none":
        return "cleartext"
    return None


def _check_notify(s: Settings) -> None:
    if s.notify_smtp_host is not None and not s.notify_mail_from:
        raise ValueError("NOTIFY_MAIL_FROM: required with NOTIFY_SMTP_HOST (the sender)")
    if s.notify_mail_from is not None and "@" not in s.notify_mail_from:
        raise ValueError("NOTIFY_MAIL_FROM: not an email address")
    problem = smtp_auth_problem(s.notify_smtp_tls, s.notify_smtp_username is not None,
                                s.notify_smtp_password is not None)
    if problem == "pair":
        raise ValueError("NOTIFY_SMTP_USERNAME: set it together with NOTIFY_SMTP_PASSWORD")
    if problem == "cleartext":
        raise ValueError("NOTIFY_SMTP_TLS: none would send NOTIFY_SMTP_PASSWORD in clear "
                         "text; use starttls or tls")
    if s.notify_smtp_ca_file is not None and not os.path.isfile(s.notify_smtp_ca_file):
        raise ValueError(f"NOTIFY_SMTP_CA_FILE: no such file: {s.notify_smtp_ca_file}")
    if s.notify_webhook_url is not None:
        try:
            _check_http_url("NOTIFY_WEBHOOK_URL", s.notify_webhook_url.get_secret_value())
        except ValueError:  # the value is a secret: never echoed
            raise ValueError("NOTIFY_WEBHOOK_URL: must be an http:// or https:// URL") from None
    if s.notify_app_base_url is not None:
        _check_http_url("NOTIFY_APP_BASE_URL", s.notify_app_base_url)


def _check_http_url(name: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name}: must be an http:// or https:// URL")


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not name:  # model-level check: the message starts with the variable's name
            problems.append(msg)
        elif name in SECRET_VARS:
            problems.append(f"{name}: {msg}")
        else:
            problems.append(f"{name}: {msg} (got {err.get('input')!r})")
    return "; ".join(problems)
