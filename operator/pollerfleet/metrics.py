"""Prometheus metrics of the operator (names start with `soundcheck_operator_`), served on
POLLERFLEET_METRICS_PORT (9090; 0 turns the endpoint off)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

registry = CollectorRegistry(auto_describe=True)
running_jobs = Gauge("soundcheck_operator_running_jobs", "Running real_polling jobs",
                     ["fleet"], registry=registry)
stale_jobs = Gauge("soundcheck_operator_stale_jobs",
                   "Running jobs with no sample for over twice their cadence",
                   ["fleet"], registry=registry)
desired_replicas = Gauge("soundcheck_operator_desired_replicas", "Pollers the fleet wants",
                         ["fleet"], registry=registry)
replicas_reporting = Gauge("soundcheck_operator_replicas_reporting",
                           "Pollers with a recent heartbeat", ["fleet"], registry=registry)
ready_replicas = Gauge("soundcheck_operator_ready_replicas", "Poller pods ready",
                       ["fleet"], registry=registry)
condition = Gauge("soundcheck_operator_fleet_condition",
                  "1 when the fleet's condition (Ready, Scaling, Degraded) is True, else 0",
                  ["fleet", "condition"], registry=registry)
handover_waiting = Gauge("soundcheck_operator_handover_waiting_seconds",
                         "How long the current handover step has been waited for (0: none)",
                         ["fleet"], registry=registry)
replicas_silent = Gauge("soundcheck_operator_replicas_silent",
                        "Pollers silent past the failover timeout (others ping their share)",
                        ["fleet"], registry=registry)
notices_pending = Gauge("soundcheck_operator_notices_pending",
                        "Alerts and completion notices waiting for delivery (database-wide)",
                        ["fleet"], registry=registry)
notice_oldest_pending = Gauge("soundcheck_operator_notice_oldest_pending_seconds",
                              "Age of the oldest notice waiting for delivery (0: none)",
                              ["fleet"], registry=registry)
notices_failed = Gauge("soundcheck_operator_notices_failed",
                       "Notices that failed for good in the last 24 hours (database-wide)",
                       ["fleet"], registry=registry)
syncs = Counter("soundcheck_operator_syncs", "Fleet syncs that read the fleet state",
                ["fleet"], registry=registry)
scale_events = Counter("soundcheck_operator_scale_events", "StatefulSet resizes", ["fleet"],
                       registry=registry)
load_errors = Counter("soundcheck_operator_load_errors", "Failed reads of the fleet state",
                      ["fleet"], registry=registry)


def serve() -> None:
    port = int(os.environ.get("POLLERFLEET_METRICS_PORT", "9090"))
    if port:
        start_http_server(port, registry=registry)
