"""Metrics: the hand-written per-ping histogram renders like prometheus_client's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from poller.metrics import FastHistogram, Metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = [0.0005, 0.001, 0.002, 0.01, 0.05, 0.5, 1.0, 2.0, 30.0]


def test_fast_histogram_renders_like_the_library() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("x_seconds", "doc", BUCKETS, ours)
    ref = Histogram("x_seconds", "doc", buckets=BUCKETS, registry=theirs)
    for v in VALUES:
        fast.observe(v)
        ref.observe(v)
    def lines(registry: CollectorRegistry) -> list[str]:
        return [ln for ln in generate_latest(registry).decode().splitlines()
                if "x_seconds_created" not in ln]  # the library adds a creation time
    assert lines(ours) == lines(theirs)


def test_metric_names_are_prefixed() -> None:
    text = Metrics().render().decode()
    names = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")}
    assert names and all(n.startswith("soundcheck_poller_") for n in names)
