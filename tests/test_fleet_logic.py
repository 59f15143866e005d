"""The operator's pure parts with plain data: spec checks, sizing, rendering."""

from __future__ import annotations

from typing import Any

import pytest
from pollerfleet import render
from pollerfleet.sizing import decide, recommend
from pollerfleet.spec import FleetSpec, SpecError, parse

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
    sizes = []
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
    pod = render.pod_template("f", s, 3)
    env = _env(pod)
    assert env["SUPABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "sb", "key": "url"}
    assert env["SUPABASE_SERVICE_ROLE_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "key"
    assert "DATABASE_URL" not in env
    assert env["LATENCY_API_URL"]["value"] == "http://spreedb:4402"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["poller"]
    assert all("value" not in e for e in env.values() if "valueFrom" in e)  # no secret inline


def test_render_shutdown_grace_fits_the_pod_grace() -> None:
    s = spec(terminationGracePeriodSeconds=40)
    pod = render.pod_template("f", s, 1)
    assert pod["spec"]["terminationGracePeriodSeconds"] == 40
    assert _env(pod)["SHUTDOWN_GRACE_MS"]["value"] == "35000"


def test_render_selector_matches_the_template() -> None:
    sts = render.statefulset("f", "ns", spec(), 2)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert render.service("f", "ns")["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert render.pdb("f", "ns")["spec"]["selector"]["matchLabels"] == labels
