"""The operator's pure parts with plain data: spec checks, sizing, rendering."""

from __future__ import annotations

from typing import Any

import pytest
from pollerfleet import render
from pollerfleet.handover import Step, next_step
from pollerfleet.sizing import decide, recommend
from pollerfleet.spec import FleetSpec, SpecError, parse

from poller.settings import SMTP_TLS_MODES, Settings

BASE: dict[str, Any] = {
    "image": "img:1",
    "database": {"secretName": "db", "databaseUrlKey": "url"},
    "latencyApiUrl": "http://spreedb:4402",
}


def spec(**over: Any) -> FleetSpec:
    return parse({**BASE, **over})


def test_defaults() -> None:
    s = spec()
    assert (s.jobs_per_replica, s.min_replicas, s.max_replicas) == (500, 1, 10)
    assert (s.scale_down_stabilization_s, s.sync_interval_s) == (300, 30)


@pytest.mark.parametrize(("over", "field"), [
    ({"image": ""}, "spec.image"),
    ({"database": {}}, "spec.database.secretName"),
    ({"database": {"secretName": "db"}}, "spec.database"),
    ({"database": {"secretName": "db", "databaseUrlKey": "u", "supabaseUrlKey": "s",
                   "serviceRoleKeyKey": "k"}}, "spec.database"),
    ({"database": {"secretName": "db", "supabaseUrlKey": "s"}}, "spec.database"),
    ({"jobsPerReplica": 0}, "spec.jobsPerReplica"),
    ({"jobsPerReplica": "many"}, "spec.jobsPerReplica"),
    ({"minReplicas": -1}, "spec.minReplicas"),
    ({"minReplicas": 5, "maxReplicas": 3}, "spec.minReplicas"),
    ({"pollerEnv": {"REPLICA_ID": "3"}}, "spec.pollerEnv"),
    ({"latencyApiUrl": None}, "spec.latencyApiUrl"),
    ({"latencySidecar": True}, "spec.latencyApiUrl"),
    ({"notifications": {"email": {"from": "a@b.c"}}}, "spec.notifications.email.host"),
    ({"notifications": {"email": {"host": "smtp", "from": "nobody"}}},
     "spec.notifications.email.from"),
    ({"notifications": {"email": {"host": "smtp", "from": "a@b.c", "tls": "ssl"}}},
     "spec.notifications.email.tls"),
    ({"notifications": {"email": {"host": "smtp", "from": "a@b.c", "port": 70000}}},
     "spec.notifications.email.port"),
    ({"notifications": {"email": {"host": "smtp", "from": "a@b.c", "secretName": "s",
                                  "usernameKey": "u"}}}, "spec.notifications.email"),
    ({"notifications": {"email": {"host": "smtp", "from": "a@b.c", "tls": "none",
                                  "secretName": "s", "usernameKey": "u",
                                  "passwordKey": "p"}}}, "spec.notifications.email.tls"),
    ({"notifications": {"webhook": {"secretName": "s"}}}, "spec.notifications.webhook"),
    ({"notifications": {"appBaseUrl": "soundcheck.example.com"}},
     "spec.notifications.appBaseUrl"),
])
def test_bad_spec_names_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        spec(**over)
    assert str(err.value).startswith(field)


def test_icmp_needs_no_latency_api() -> None:
    assert spec(latencyApiUrl=None, pollerEnv={"PING_BACKEND": "icmp"}).latency_api_url is None


@pytest.mark.parametrize(("running", "expected"), [
    (0, 1), (1, 1), (500, 1), (501, 2), (4999, 10), (10**6, 10)])
def test_recommendation_is_clamped(running: int, expected: int) -> None:
    assert recommend(running, spec()) == expected


def test_zero_when_nothing_runs_and_min_is_zero() -> None:
    assert recommend(0, spec(minReplicas=0)) == 0


def test_up_at_once() -> None:
    d = decide(2600, current=2, spec=spec(), history=(), now=1000.0)
    assert d.desired == 6


def test_down_only_after_the_window() -> None:
    s = spec(scaleDownStabilizationSeconds=60)
    history: tuple[tuple[float, int], ...] = ()
    sizes: list[int] = []
    for t in range(0, 130, 10):  # load drops from 6 replicas' worth to 2 at t=0
        d = decide(900, current=6 if not sizes else sizes[-1], spec=s, history=history,
                   now=float(t))
        history = d.history
        sizes.append(d.desired)
    assert sizes[:6] == [6] * 6  # t = 0 … 50: the current size still counts
    assert sizes[6:] == [2] * 7  # t = 60 on: the dip held a whole window


def test_a_spike_inside_the_window_holds_the_size() -> None:
    s = spec(scaleDownStabilizationSeconds=60)
    history = ((0.0, 2), (30.0, 5))
    assert decide(900, current=5, spec=s, history=history, now=70.0).desired == 5
    assert decide(900, current=5, spec=s, history=history, now=91.0).desired == 2


def test_no_window_scales_down_at_once() -> None:
    s = spec(scaleDownStabilizationSeconds=0)
    assert decide(0, current=4, spec=s, history=(), now=0.0).desired == 1


def test_history_keeps_only_the_window() -> None:
    s = spec(scaleDownStabilizationSeconds=60)
    d = decide(0, current=1, spec=s, history=((0.0, 3), (50.0, 1)), now=100.0)
    assert d.history == ((50.0, 1), (100.0, 1))


def _env(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_render_supabase_secrets_and_no_sidecar() -> None:
    s = spec(database={"secretName": "sb", "supabaseUrlKey": "url",
                       "serviceRoleKeyKey": "key"})
    pod = render.pod_template("f", "ns", s)
    env = _env(pod)
    assert env["SUPABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "sb", "key": "url"}
    assert env["SUPABASE_SERVICE_ROLE_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "key"
    assert "DATABASE_URL" not in env
    assert env["LATENCY_API_URL"]["value"] == "http://spreedb:4402"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["poller"]
    assert all("value" not in e for e in env.values() if "valueFrom" in e)  # no secret inline


def test_render_sidecar_pings_on_loopback_and_pods_hold_no_token() -> None:
    s = spec(latencySidecar=True, latencyApiUrl=None,
             pollerEnv={"TARGET_DENY": "10.0.0.0/8"})
    pod = render.pod_template("f", "ns", s)
    assert pod["spec"]["automountServiceAccountToken"] is False
    _, sidecar = pod["spec"]["containers"]
    args = sidecar["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"  # the ping API: loopback only
    assert sidecar["livenessProbe"]["httpGet"]["port"] == "latency-health"
    assert [p["containerPort"] for p in sidecar["ports"]] == [render.SIDECAR_HEALTH_PORT]
    assert _env(pod)["LATENCY_API_URL"]["value"] == f"http://127.0.0.1:{render.SIDECAR_PORT}"
    assert {"name": "TARGET_DENY", "value": "10.0.0.0/8"} in sidecar["env"]


def test_render_shutdown_grace_fits_the_pod_grace() -> None:
    s = spec(terminationGracePeriodSeconds=40)
    pod = render.pod_template("f", "ns", s)
    assert pod["spec"]["terminationGracePeriodSeconds"] == 40
    assert _env(pod)["SHUTDOWN_GRACE_MS"]["value"] == "35000"


def test_resizing_does_not_change_the_pod_template() -> None:
    a = render.statefulset("f", "ns", spec(), 2)
    b = render.statefulset("f", "ns", spec(), 7)
    assert a["spec"]["template"] == b["spec"]["template"]
    assert _env(a["spec"]["template"])["FLEET_NAME"]["value"] == "ns/f"
    assert "REPLICA_COUNT" not in _env(a["spec"]["template"])


def test_render_selector_matches_the_template() -> None:
    sts = render.statefulset("f", "ns", spec(), 2)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert render.service("f", "ns")["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert render.pdb("f", "ns")["spec"]["selector"]["matchLabels"] == labels


# Handover ---------------------------------------------------------------------------------


def test_a_new_fleet_publishes_then_scales() -> None:
    assert next_step(None, 0, pods=0, ready=0, desired=3, seen={}) == Step((3,), 3)


def test_grow_scales_first_then_hands_over_when_ready_and_seen() -> None:
    steps = [
        next_step((2,), 1, pods=2, ready=2, desired=4, seen={0: 1, 1: 1}),
        next_step((2,), 1, pods=4, ready=3, desired=4, seen={0: 1, 1: 1}),
        next_step((2,), 1, pods=4, ready=4, desired=4, seen={0: 1, 1: 1}),
        next_step((2, 4), 2, pods=4, ready=4, desired=4, seen={0: 2, 1: 2, 2: 2}),
        next_step((2, 4), 2, pods=4, ready=4, desired=4, seen={0: 2, 1: 2, 2: 2, 3: 2}),
        next_step((4,), 3, pods=4, ready=4, desired=4, seen={}),
    ]
    assert steps[0] == Step(scale_to=4)
    assert steps[1].publish is None and "ready" in steps[1].waiting
    assert steps[2] == Step(publish=(2, 4))
    assert steps[3].publish is None and "sync" in steps[3].waiting  # replica 3 not yet
    assert steps[4] == Step(publish=(4,))
    assert steps[5] == Step()


def test_shrink_hands_over_before_the_pods_go() -> None:
    assert next_step((4,), 3, pods=4, ready=4, desired=1, seen={}) == Step(publish=(4, 1))
    assert next_step((4, 1), 4, pods=4, ready=4, desired=1,
                     seen={0: 4, 1: 4, 2: 3, 3: 4}).publish is None
    assert next_step((4, 1), 4, pods=4, ready=4, desired=1,
                     seen={0: 4, 1: 4, 2: 4, 3: 4}) == Step(publish=(1,), scale_to=1)


def test_to_zero_and_back() -> None:
    assert next_step((3,), 5, pods=3, ready=3, desired=0, seen={}) == Step(scale_to=0)
    assert next_step((3,), 5, pods=0, ready=0, desired=0, seen={}) == Step()
    assert next_step((3,), 5, pods=0, ready=0, desired=2, seen={}) == Step((2,), 2)
    assert next_step((2,), 6, pods=0, ready=0, desired=2, seen={}) == Step(scale_to=2)


def test_missing_pods_get_their_buckets_taken_over() -> None:
    # e.g. someone scaled the StatefulSet by hand, or a step was lost in a crash
    assert next_step((4,), 2, pods=2, ready=2, desired=2, seen={}) == Step(publish=(4, 2))


NOTIFY = {"appBaseUrl": "https://app.example.com",
          "email": {"host": "smtp.example.com", "from": "Sound Check <noreply@example.com>",
                    "secretName": "mail", "usernameKey": "user", "passwordKey": "pass"},
          "webhook": {"secretName": "hook", "urlKey": "url"}}


def test_render_notifications_from_secrets_and_the_poller_accepts_them() -> None:
    env = _env(render.pod_template("f", "ns", spec(notifications=NOTIFY)))
    assert env["NOTIFY_SMTP_HOST"]["value"] == "smtp.example.com"
    assert env["NOTIFY_SMTP_PORT"]["value"] == "587"
    assert env["NOTIFY_SMTP_TLS"]["value"] == "starttls"
    assert env["NOTIFY_SMTP_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mail",
                                                                         "key": "pass"}
    assert env["NOTIFY_WEBHOOK_URL"]["valueFrom"]["secretKeyRef"] == {"name": "hook",
                                                                       "key": "url"}
    # What the kubelet would hand the poller (secrets resolved): settings it accepts.
    resolved = {name: e.get("value", "https://hooks.example.com/t" if name.endswith("URL")
                               else "x") for name, e in env.items()}
    resolved |= {"REPLICA_ID": "0", "DATABASE_URL": "postgresql://u@db/x"}
    settings = Settings.from_env(resolved)
    assert settings.notify_channels == ("email", "webhook")


def test_no_notifications_no_notify_settings() -> None:
    env = _env(render.pod_template("f", "ns", spec()))
    assert not [name for name in env if name.startswith("NOTIFY_")]


def test_every_secret_the_pods_read_is_listed_with_its_keys() -> None:
    assert spec().secret_refs() == [("spec.database", "db", ["url"])]
    assert spec(notifications=NOTIFY).secret_refs() == [
        ("spec.database", "db", ["url"]),
        ("spec.notifications.email", "mail", ["user", "pass"]),
        ("spec.notifications.webhook", "hook", ["url"])]


def test_the_applied_size_is_read_from_the_annotation_not_the_live_replicas() -> None:
    sts = render.statefulset("pf", "ns", parse({"image": "i", "latencySidecar": True,
                                                "database": {"secretName": "s",
                                                             "databaseUrlKey": "k"}}), 3)
    assert render.applied_replicas(sts) == 3
    sts["spec"]["replicas"] = 7  # kubectl scale: the annotation keeps the operator's size
    assert render.applied_replicas(sts) == 3
    del sts["metadata"]["annotations"]  # made by an operator that did not mark it
    assert render.applied_replicas(sts) == 7
    assert render.applied_replicas(None) == 0


def test_poller_env_is_every_setting_the_operator_does_not_set() -> None:
    from pollerfleet.spec import POLLER_ENV, SET_BY_THE_OPERATOR

    aliases = {f.alias for f in Settings.model_fields.values() if f.alias}
    assert aliases == POLLER_ENV | SET_BY_THE_OPERATOR
    assert aliases >= SET_BY_THE_OPERATOR  # no stale name
    base = {"image": "i", "latencySidecar": True,
            "database": {"secretName": "s", "databaseUrlKey": "k"}}
    assert parse({**base, "pollerEnv": {"NOTIFY_SMTP_CA_FILE": "/etc/ca.pem"}}).poller_env == {
        "NOTIFY_SMTP_CA_FILE": "/etc/ca.pem"}
    with pytest.raises(SpecError, match=r"spec\.pollerEnv: not settable here: DATABASE_URL"):
        parse({**base, "pollerEnv": {"DATABASE_URL": "postgresql://x"}})


def test_the_operator_does_not_load_the_poller_service() -> None:
    """The operator needs the store, not the poller's lifecycle (a narrow seam)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, pollerfleet.handlers; "
         "print(sorted(m for m in sys.modules if m.startswith('poller.')))"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert "poller.service" not in out and "poller.store" in out, out


# The CRD's schema defaults and the operator's (FleetSpec) must be the same numbers.
CRD_TO_SPEC = {"jobsPerReplica": "jobs_per_replica", "minReplicas": "min_replicas",
               "maxReplicas": "max_replicas",
               "scaleDownStabilizationSeconds": "scale_down_stabilization_s",
               "syncIntervalSeconds": "sync_interval_s", "failoverTimeoutSeconds": "failover_s",
               "staleJobsWindowSeconds": "stale_window_s",
               "terminationGracePeriodSeconds": "termination_grace_s",
               "imagePullPolicy": "image_pull_policy", "latencySidecar": "latency_sidecar"}


def test_crd_defaults_are_the_operators() -> None:
    from pathlib import Path

    import yaml

    crd = yaml.safe_load((Path(__file__).parents[1] / "crds" / "pollerfleet.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]
    defaulted = {k for k, v in props.items() if "default" in v}
    assert defaulted == set(CRD_TO_SPEC)  # a new default needs its counterpart here
    parsed = parse({"image": "i", "latencyApiUrl": "http://l:4402",
                    "database": {"secretName": "s", "databaseUrlKey": "k"}})
    for key, attr in CRD_TO_SPEC.items():
        assert props[key]["default"] == getattr(parsed, attr), key
    email = props["notifications"]["properties"]["email"]["properties"]
    from pollerfleet.spec import EmailSpec
    assert (email["port"]["default"], email["tls"]["default"]) == (EmailSpec.port, EmailSpec.tls)
    assert email["tls"]["enum"] == list(SMTP_TLS_MODES)


@pytest.mark.parametrize(("failover", "poll_ms", "ok"), [
    (15, None, True),     # the defaults: 15 s against 2 x 5 s
    (10, None, True),     # exactly twice
    (9, None, False),
    (2, "500", True),
    (2, "1500", False),
])
def test_failover_timeout_is_checked_against_the_sync_interval(
        failover: int, poll_ms: str | None, ok: bool) -> None:
    spec: dict[str, Any] = {"image": "i", "latencySidecar": True, "failoverTimeoutSeconds":
                            failover, "database": {"secretName": "s", "databaseUrlKey": "k"}}
    if poll_ms is not None:
        spec["pollerEnv"] = {"POLL_INTERVAL_MS": poll_ms}
    if ok:
        assert parse(spec).failover_s == failover
    else:
        with pytest.raises(SpecError, match=r"^spec\.failoverTimeoutSeconds: "):
            parse(spec)


def test_the_crd_coordinates_are_the_operators() -> None:
    from pathlib import Path

    import yaml
    from pollerfleet.crd import GROUP, PLURAL, VERSION

    crd = yaml.safe_load((Path(__file__).parents[1] / "crds" / "pollerfleet.yaml").read_text())
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert (crd["spec"]["group"], crd["spec"]["names"]["plural"]) == (GROUP, PLURAL)
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == [VERSION]
