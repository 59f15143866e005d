"""The operations kit (monitoring/): alert rules checked and unit-tested with promtool,
the PrometheusRule identical to the plain rules, the kustomize component, the dashboard;
every metric they name is one the code exports, and both processes' /metrics pass
`promtool check metrics`."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from poller.localpg import free_port
from poller.metrics import Metrics
from poller.service import Service
from poller.settings import Settings
from tests.support.kustomize import kustomize
from tests.support.latency_standin import LatencyStandIn

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                    "(Debian: apt-get install prometheus)")
METRIC = re.compile(r"\b(soundcheck_(?:poller|operator)_[a-z_]+)")


def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MON / "rules.yml").read_text())
    return loaded


def alerts() -> list[dict[str, Any]]:
    return [r for g in rules()["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=MON, input=stdin, capture_output=True,
                          text=True, timeout=120)


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", "rules.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_every_alert_fires_when_it_should_and_only_then() -> None:
    out = promtool("test", "rules", "rules.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MON / "rules.test.yml").read_text()))
    assert tested == {a["alert"] for a in alerts()}


def test_prometheusrule_holds_the_same_rules() -> None:
    (rule,) = [d for d in yaml.safe_load_all((MON / "prometheusrule.yaml").read_text()) if d]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == rules()


def test_every_alert_has_severity_summary_and_a_runbook_file() -> None:
    runbooks = ROOT / "docs" / "runbooks"
    index = (runbooks / "README.md").read_text()
    for group in rules()["groups"]:
        for alert in group["rules"]:
            name = alert["alert"]
            assert alert["labels"]["severity"] in ("critical", "warning"), name
            if group["name"] != "soundcheck-scrape":  # those watch targets, not a fleet
                assert "{{ $labels.fleet }}" in alert["annotations"]["summary"], name
            # Absolute once Prometheus has the external label (docs/monitoring.md, "Runbook links").
            assert alert["annotations"]["runbook_url"] == (
                "{{ $externalLabels.runbook_base_url }}/" + name + ".md"), name
            text = (runbooks / f"{name}.md").read_text()
            assert text.startswith(f"# Runbook: {name}\n"), name
            assert "*Meaning.*" in text and "*Fix.*" in text, name
            assert f"({name}.md)" in index, name
    files = {p.stem for p in runbooks.glob("SoundCheck*.md")}
    assert files == {a["alert"] for a in alerts()}  # no runbook left without its alert


def _exported(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def test_every_metric_named_in_rules_and_dashboard_is_exported() -> None:
    from pollerfleet import metrics as operator_metrics

    exported = _exported(Metrics().registry) | _exported(operator_metrics.registry)
    named = set(METRIC.findall((MON / "rules.yml").read_text()))
    named |= set(METRIC.findall((MON / "grafana-dashboard.json").read_text()))
    assert len(named) >= 20
    assert named <= exported, named - exported


def test_dashboard_is_importable_with_a_prometheus_input() -> None:
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    shown = list(panels(dash["panels"]))
    kinds = {p["type"] for p in shown}
    assert {"heatmap", "timeseries", "stat", "row"} <= kinds
    for p in shown:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    ids = [p["id"] for p in shown]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_component_renders_with_kustomize(tmp_path: Path) -> None:
    objs = [o for o in kustomize(tmp_path, MON) if o["apiVersion"].startswith("monitoring.")]
    assert sorted(o["kind"] for o in objs) == ["PodMonitor", "PodMonitor", "PrometheusRule"]
    assert all(o["metadata"]["namespace"] == "soundcheck" for o in objs)


def test_scrape_example_sets_the_labels_the_rules_use() -> None:
    # Debian's promtool is built without Kubernetes service discovery, so `promtool check
    # config` cannot read this file here; its labels are checked instead.
    config = yaml.safe_load((MON / "scrape-config.example.yml").read_text())
    jobs = {j["job_name"]: {r.get("target_label") for r in j["relabel_configs"]}
            for j in config["scrape_configs"]}
    assert {"fleet", "pod", "namespace"} <= jobs["soundcheck-poller"]
    assert {"pod", "namespace"} <= jobs["pollerfleet-operator"]


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


@needs_promtool
async def test_live_metrics_of_both_processes_pass_promtool(
        dsn: str, standin: LatencyStandIn) -> None:
    import asyncpg
    from pollerfleet import metrics as operator_metrics

    from tests.support.db import add_jobs

    conn = await asyncpg.connect(dsn)
    await add_jobs(conn, ["127.0.0.1", "192.0.2.1"], cadence_seconds=1)
    await conn.close()
    port = free_port()
    svc = Service(Settings.from_env({"DATABASE_URL": dsn, "LATENCY_API_URL": standin.url,
                                     "PORT": str(port), "POLL_INTERVAL_MS": "200",
                                     "BATCH_FLUSH_INTERVAL_MS": "100"}))
    await svc.start()
    try:
        async with asyncio.timeout(20):
            await svc.progress.wait_for(
                lambda: svc.metrics.value("soundcheck_poller_samples_written_total") >= 2)
        poller_text = await _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await svc.stop()
    out = promtool("check", "metrics", stdin=poller_text)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr

    fleet = "soundcheck/lint"
    operator_metrics.running_jobs.labels(fleet).set(2)
    operator_metrics.syncs.labels(fleet).inc()
    operator_metrics.condition.labels(fleet, "Ready").set(1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1",
                                       registry=operator_metrics.registry)
    try:
        operator_text = await _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        thread.join(5)
    assert "soundcheck_operator_syncs_total" in operator_text
    out = promtool("check", "metrics", stdin=operator_text)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
