"""Settings: defaults of the original service, one clear line per bad value, no secrets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from poller.settings import ConfigError, Settings

DB = {"DATABASE_URL": "postgresql://poller:hunter2-secret@db.internal:5432/soundcheck"}
KEY = "service-role-key-abcdef0123456789"
SB = {"SUPABASE_URL": "https://project.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": KEY}


def test_defaults_match_the_original_service() -> None:
    s = Settings.from_env(DB)
    assert (s.port, s.latency_api_url, s.poll_interval_ms, s.batch_flush_interval_ms) == (
        3000, "http://localhost:4402", 5000, 2000)
    assert (s.batch_size, s.concurrency, s.replica_count, s.replica_id) == (100, 50, 1, 0)
    assert s.ping_timeout_ms == 10_000
    assert s.transport == "postgres"


def test_supabase_selects_the_supabase_transport() -> None:
    assert Settings.from_env(SB).transport == "supabase"


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"PORT": "abc"}, "PORT", "integer"),
        ({"PORT": "70000"}, "PORT", "65535"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE", "greater than or equal to 1"),
        ({"CONCURRENCY": "-3"}, "CONCURRENCY", "greater than or equal to 1"),
        ({"POLL_INTERVAL_MS": "5s"}, "POLL_INTERVAL_MS", "integer"),
        ({"BATCH_FLUSH_INTERVAL_MS": "1"}, "BATCH_FLUSH_INTERVAL_MS", "10"),
        ({"REPLICA_COUNT": "0"}, "REPLICA_COUNT", "greater than or equal to 1"),
        ({"REPLICA_ID": "3", "REPLICA_COUNT": "3"}, "REPLICA_ID", "not below REPLICA_COUNT=3"),
        ({"LATENCY_API_URL": "localhost:4402"}, "LATENCY_API_URL", "http://"),
        ({"LATENCY_API_ROUTE": "udp"}, "LATENCY_API_ROUTE", "'latency' or 'ping'"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "'text' or 'json'"),
        ({"PING_TIMEOUT_MS": "5"}, "PING_TIMEOUT_MS", "100"),
        ({"NOTIFY_SMTP_HOST": "smtp.example.com"}, "NOTIFY_MAIL_FROM", "required"),
        ({"NOTIFY_SMTP_HOST": "smtp", "NOTIFY_MAIL_FROM": "nobody"}, "NOTIFY_MAIL_FROM",
         "not an email address"),
        ({"NOTIFY_SMTP_USERNAME": "u"}, "NOTIFY_SMTP_USERNAME", "NOTIFY_SMTP_PASSWORD"),
        ({"NOTIFY_SMTP_TLS": "ssl"}, "NOTIFY_SMTP_TLS", "'starttls', 'tls' or 'none'"),
        ({"NOTIFY_SMTP_TLS": "none", "NOTIFY_SMTP_USERNAME": "u",
          "NOTIFY_SMTP_PASSWORD": "hunter2"}, "NOTIFY_SMTP_TLS", "clear text"),
        ({"NOTIFY_SMTP_CA_FILE": "/nonexistent/ca.pem"}, "NOTIFY_SMTP_CA_FILE", "no such"),
        ({"NOTIFY_WEBHOOK_URL": "hooks.example.com/hunter2"}, "NOTIFY_WEBHOOK_URL",
         "http://"),
        ({"NOTIFY_APP_BASE_URL": "soundcheck"}, "NOTIFY_APP_BASE_URL", "http://"),
        ({"NOTIFY_MAX_ATTEMPTS": "0"}, "NOTIFY_MAX_ATTEMPTS", "greater than or equal to 1"),
        ({"ALERT_SETTLE_S": "-1"}, "ALERT_SETTLE_S", "greater than or equal to 0"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], variable: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**DB, **env})
    message = str(err.value)
    assert message.startswith(f"{variable}: "), message
    assert fragment in message
    assert "hunter2" not in message


def test_no_database_target() -> None:
    with pytest.raises(ConfigError, match=r"^DATABASE_URL: no database target"):
        Settings.from_env({})


def test_both_database_targets() -> None:
    with pytest.raises(ConfigError, match="not both") as err:
        Settings.from_env({**DB, **SB})
    assert KEY not in str(err.value) and "hunter2" not in str(err.value)


def test_supabase_url_without_key() -> None:
    with pytest.raises(ConfigError, match=r"^SUPABASE_SERVICE_ROLE_KEY: required"):
        Settings.from_env({"SUPABASE_URL": "https://x.supabase.co"})


def test_key_without_url_and_key_never_echoed() -> None:
    with pytest.raises(ConfigError, match=r"^SUPABASE_URL: required") as err:
        Settings.from_env({"SUPABASE_SERVICE_ROLE_KEY": KEY})
    assert KEY not in str(err.value)


def test_bad_database_url_scheme_does_not_echo_it() -> None:
    with pytest.raises(ConfigError, match=r"^DATABASE_URL: must start with postgresql://") as e:
        Settings.from_env({"DATABASE_URL": "mysql://u:hunter2@h/db"})
    assert "hunter2" not in str(e.value)


def test_replica_id_from_hostname_ordinal() -> None:
    env = {**DB, "HOSTNAME": "soundcheck-poller-2", "REPLICA_COUNT": "3"}
    assert Settings.from_env(env).replica_id == 2
    assert Settings.from_env({**env, "REPLICA_ID": "1"}).replica_id == 1  # explicit wins
    assert Settings.from_env({**DB, "HOSTNAME": "laptop"}).replica_id == 0


def test_hostname_ordinal_beyond_count_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^REPLICA_ID: 4 is not below REPLICA_COUNT=3"):
        Settings.from_env({**DB, "HOSTNAME": "poller-4", "REPLICA_COUNT": "3"})


def test_empty_values_mean_unset() -> None:
    assert Settings.from_env({**DB, "PORT": "", "SUPABASE_URL": ""}).port == 3000


def test_entry_point_exits_2_with_one_line_and_no_secret() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")}
    env.update(SB)
    env["BATCH_SIZE"] = "lots"
    proc = subprocess.run([sys.executable, "-m", "poller"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "BATCH_SIZE" in lines[0]
    assert KEY not in proc.stderr + proc.stdout


@pytest.mark.parametrize("url", [
    "postgresql://u:hunter2@db.internal:54x2/soundcheck",
    "postgresql://u:hunter2@db.internal:99999/soundcheck",
    "postgresql://u:hunter2@db.internal:0/soundcheck",
    "postgresql://u:hunter2@h1:5432,h2:port/soundcheck",
])
def test_a_bad_database_port_is_a_configuration_error(url: str) -> None:
    # Before: the process started and its sync loop crashed at the first connection.
    with pytest.raises(ConfigError, match=r"^DATABASE_URL: the port is not a number") as e:
        Settings.from_env({"DATABASE_URL": url})
    assert "hunter2" not in str(e.value)


def test_no_notify_settings_no_channels() -> None:
    assert Settings.from_env(DB).notify_channels == ()
    both = Settings.from_env({**DB, "NOTIFY_SMTP_HOST": "smtp", "NOTIFY_MAIL_FROM": "a@b.c",
                              "NOTIFY_WEBHOOK_URL": "https://hooks.example.com/t"})
    assert both.notify_channels == ("email", "webhook")
