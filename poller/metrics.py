"""Prometheus metrics of one poller process (names start with `soundcheck_poller_`).

Each `Metrics` has its own registry, so tests can run several services in one process.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .models import SampleStatus

_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class FastHistogram(Collector):
    """A histogram observed once per ping: a bisect and two additions, rendered as a
    normal Prometheus histogram at scrape time. prometheus_client's Histogram takes a
    lock and walks its buckets in Python on every observation, which measured as a
    tenth of the whole pipeline's CPU per ping. Single-threaded use only (the event loop).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, total = [], 0
        for bound, count in zip([*map(str, self._bounds), "+Inf"], self._counts, strict=True):
            total += count
            cumulative.append((bound, total))
        yield HistogramMetricFamily(self._name, self._doc, buckets=cumulative,
                                    sum_value=self._sum)


class FastCounter(Collector):
    """A counter with one label, incremented once per ping: a plain int per label value,
    rendered at scrape time. prometheus_client's Counter takes a lock on every increment,
    half a microsecond, as much as a ping's other bookkeeping together. Single-threaded
    use only (the event loop)."""

    def __init__(self, name: str, documentation: str, label: str, values: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self._name, self._doc, self._label = name, documentation, label
        self.counts = dict.fromkeys(values, 0)  # incremented in place by the hot path
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=[self._label])
        for value, count in self.counts.items():
            family.add_metric([str(value)], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pings = FastCounter(
            "soundcheck_poller_pings", "Pings made, by resulting sample status", "status",
            [s.value for s in SampleStatus], r)
        self.rtt = FastHistogram(
            "soundcheck_poller_rtt_seconds", "Round-trip time of successful pings",
            _RTT_BUCKETS, r)
        self.lateness = FastHistogram(
            "soundcheck_poller_lateness_seconds",
            "How long after its slot's due time a ping started", _LATENESS_BUCKETS, r)
        self.buffered = Gauge(
            "soundcheck_poller_buffered_samples", "Samples waiting to be written", registry=r
        )
        self.written = Counter(
            "soundcheck_poller_samples_written", "Samples accepted by the database", registry=r
        )
        self.dropped = Counter(
            "soundcheck_poller_samples_dropped",
            "Samples dropped because the buffer was full during a database outage", registry=r,
        )
        self.rejected = Counter(
            "soundcheck_poller_samples_rejected",
            "Samples set aside because the database rejected their values", registry=r,
        )
        self.late = Counter(
            "soundcheck_poller_samples_late",
            "Samples refused because their job was already completed "
            "(docs/alerts-and-notices.md, \"Late samples\")",
            registry=r,
        )
        self.skipped = Counter(
            "soundcheck_poller_slots_skipped",
            "Overdue slots passed over after a stall (only the newest of a job is pinged)",
            registry=r,
        )
        self.flushes = Counter(
            "soundcheck_poller_flushes", "Batch writes (one SQL API call each)", registry=r
        )
        self.flush_errors = Counter(
            "soundcheck_poller_flush_errors", "Batch writes that failed and will be retried",
            registry=r,
        )
        self.syncs = Counter("soundcheck_poller_syncs", "Job syncs that succeeded", registry=r)
        self.sync_errors = Counter(
            "soundcheck_poller_sync_errors", "Job syncs that failed", registry=r
        )
        self.heartbeats = Counter(
            "soundcheck_poller_heartbeats", "Heartbeat-only syncs made while a long full read "
            "was taken up (so the fleet does not take this replica for dead)", registry=r,
        )
        self.full_syncs = Counter(
            "soundcheck_poller_full_syncs", "Syncs that read every owned job (at start, on "
            "a topology or live-set change, every SYNC_FULL_INTERVAL_S); the others read "
            "only what changed", registry=r)
        self.owned_jobs = Gauge(
            "soundcheck_poller_owned_jobs", "Running jobs this replica pings", registry=r
        )
        self.in_flight = Gauge(
            "soundcheck_poller_pings_in_flight", "Pings started and not yet answered", registry=r
        )
        self.completed = Counter(
            "soundcheck_poller_jobs_completed", "Jobs this replica marked completed", registry=r
        )
        self.alerts = Counter(
            "soundcheck_poller_alerts_raised", "Alert state transitions this replica's "
            "batches made (offline, recovery)", ["type"], registry=r)
        self.notices_sent = Counter(
            "soundcheck_poller_notices_sent", "Notices a delivery channel accepted",
            ["channel"], registry=r)
        self.notice_failures = Counter(
            "soundcheck_poller_notice_failures", "Delivery attempts a channel failed "
            "(retried with backoff)", ["channel"], registry=r)
        self.notices_given_up = Counter(
            "soundcheck_poller_notices_given_up", "Notices marked failed after "
            "NOTIFY_MAX_ATTEMPTS attempts", registry=r)
        self.notice_channels = Gauge(
            "soundcheck_poller_notice_channels", "Delivery channels this replica delivers "
            "notices with (0: it delivers none)", registry=r)
        self.outbox_pending = Gauge(
            "soundcheck_poller_outbox_pending", "Notices waiting in the outbox (fleet-wide), "
            "as of this replica's last claim", registry=r)
        self.last_sync = Gauge(
            "soundcheck_poller_last_sync_timestamp_seconds", "When the last good sync ended",
            registry=r,
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one exported sample, e.g. `soundcheck_poller_syncs_total`."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
