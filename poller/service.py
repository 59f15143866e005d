"""The poller process: one settings object, an explicit start/stop lifecycle, signal
handling in one place, every background task owned and awaited.

    sync loop ──jobs──▶ scheduler ──slots──▶ prober ──samples──▶ recorder ──batches──▶ store
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import __version__
from .logs import RateLimited
from .metrics import Metrics
from .models import SampleStatus
from .notices import Channel, make_channels
from .notices.delivery import Deliverer
from .pingers import Pinger
from .pingers.latency_api import LatencyApiPinger
from .prober import Prober
from .probes import make_app
from .progress import Progress
from .recorder import Recorder
from .scheduler import Scheduler
from .settings import Settings
from .store import (
    API_VERSION,
    Store,
    StoreError,
    StoreMisconfigured,
    check_api_version,
    make_store,
    raise_if_cancelling,
)
from .sync import Sync
from .targets import TargetPolicy, parse_networks

log = logging.getLogger("poller")

_STUCK_S = 10.0  # a loop that has not turned for this long (beyond its own waits) is stuck


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _bounded(aw: Any, timeout_s: float) -> None:
    """Await a clean-up step for at most `timeout_s`; a step that fails is logged, not
    raised, so the steps after it still run."""
    try:
        async with asyncio.timeout(timeout_s):
            await aw
    except Exception:
        log.warning("stopping: a clean-up step did not finish", exc_info=True)


def make_pinger(settings: Settings) -> Pinger:
    if settings.ping_backend == "icmp":
        from .pingers.icmp import IcmpPinger

        return IcmpPinger(settings.ping_timeout_ms / 1000, settings.icmp_socket)
    return LatencyApiPinger(
        settings.latency_api_url,
        route=settings.latency_api_route,
        group=settings.latency_api_group,
        timeout_s=settings.ping_timeout_ms / 1000,
        concurrency=settings.concurrency,
    )


class Service:
    def __init__(
        self, settings: Settings, store: Store | None = None, pinger: Pinger | None = None,
        channels: list[Channel] | None = None,
    ) -> None:
        self.settings = s = settings
        self.metrics = Metrics()
        self.store = store or make_store(s)
        self.pinger = pinger or make_pinger(s)
        # Notified after every sync and every batch write, whether it worked or not.
        self.progress = Progress()
        self.recorder = Recorder(
            self.store, self.metrics,
            batch_size=s.batch_size,
            flush_interval_s=s.batch_flush_interval_ms / 1000,
            max_buffered=s.max_buffered_samples,
            max_backoff_s=s.retry_max_backoff_ms / 1000,
            progress=self.progress,
        )
        self.prober = Prober(
            self.pinger, self.recorder, self.metrics,
            concurrency=s.concurrency, timeout_s=s.ping_timeout_ms / 1000,
        )
        self.scheduler = Scheduler(self.prober.on_slot, self.prober.on_expired,
                                   on_skipped=self.prober.on_skipped,
                                   policy=TargetPolicy(parse_networks(s.target_deny)))
        channels = make_channels(s) if channels is None else channels
        # Alerts and completion notices: delivered by this process only with a channel.
        self.deliverer = (Deliverer(self.store, channels, s, self.metrics) if channels
                          else None)
        self.metrics.notice_channels.set(len(channels))
        # The sync stage (store → scheduler) and the fleet membership it reports.
        self.sync = Sync(s, self.store, self.scheduler, self.metrics, self.progress)
        self._sync_now = asyncio.Event()
        self.crashed = False
        self.stopping = asyncio.Event()
        self.first_sync_done = False
        self.last_sync_ok: float | None = None  # monotonic
        self.sync_error: str | None = None
        self.sync_heartbeat = time.monotonic()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runner: web.AppRunner | None = None
        self._say = RateLimited(log, 60.0)

    # Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        log.info(
            "poller %s starting: replica %d/%d, transport %s, pinger %s, port %d, notices %s",
            __version__, s.replica_id, s.replica_count, s.transport, s.ping_backend, s.port,
            ", ".join(c.name for c in self.deliverer.channels) if self.deliverer
            else "not delivered here (no NOTIFY_SMTP_HOST or NOTIFY_WEBHOOK_URL)",
        )
        await self.pinger.start()  # first: a missing ICMP permission fails before anything
        await self.store.open()
        self._runner = web.AppRunner(make_app(self), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", s.port).start()
        self._tasks = {
            "sync": asyncio.create_task(self._sync_loop(), name="sync"),
            "scheduler": asyncio.create_task(self.scheduler.run(), name="scheduler"),
            "recorder": asyncio.create_task(self.recorder.run(), name="recorder"),
        }
        if self.deliverer is not None:
            self._tasks["notices"] = asyncio.create_task(self.deliverer.run(), name="notices")

    async def stop(self) -> bool:
        """Graceful stop within SHUTDOWN_GRACE_MS, whatever the database does (refuses,
        hangs, is frozen); True when every sample was written."""
        self.stopping.set()  # /ready answers 503 from here on
        deadline = time.monotonic() + self.settings.shutdown_grace_ms / 1000
        log.info("stopping: no new pings; finishing %d out, %d samples buffered",
                 self.prober.pending, self.recorder.buffered)
        # A handover needs the database (and is moot for a replica that pings nothing, such
        # as one a scale-down leaves outside the topology).
        if self.settings.fleet_name and self.first_sync_done and not self.sync_error \
                and self.scheduler.jobs:
            await self._hand_over(deadline)
        self.scheduler.stop()
        if self.deliverer is not None:
            # Let a claim in hand finish and record its outcome (each send is bounded).
            self.deliverer.stop()
            await asyncio.wait([self._tasks["notices"]], timeout=max(0.1, _left(deadline) / 4))
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # A call stuck in a client library may ignore its cancellation for a while: wait
            # a bounded time, then close the store under it (below), which ends it.
            _, stuck = await asyncio.wait(tasks, timeout=max(0.1, _left(deadline) / 4))
            if stuck:
                log.warning("stopping: %s still finishing, closing under them",
                            ", ".join(sorted(t.get_name() for t in stuck)))
        # Leave at least a third of the grace for the final writes.
        await self.prober.drain(min(_left(deadline) * 2 / 3,
                                    self.settings.ping_timeout_ms / 1000 + 1))
        complete = await self.recorder.drain(deadline)
        await _bounded(self.pinger.close(), 1.0)
        await _bounded(self.store.close(), max(0.5, _left(deadline)))
        await asyncio.wait(tasks, timeout=1.0)
        if self._runner is not None:
            await _bounded(self._runner.cleanup(), 1.0)
        pings = sum(self.metrics.value("soundcheck_poller_pings_total", {"status": st.value})
                    for st in SampleStatus)
        log.info("stopped: %s; %d pings made, %d samples inserted",
                 "all samples written" if complete else "samples were lost", pings,
                 self.metrics.value("soundcheck_poller_samples_written_total"))
        return complete

    async def _hand_over(self, deadline: float) -> None:
        """Say this replica is leaving and keep pinging until every live replica has applied
        a sync made after that (so they ping its share), within half the grace: a graceful
        stop (rolling update, eviction, scale-down) then leaves no slot unpinged."""
        budget = _left(deadline) / 2
        self.sync.leaving = True
        self._sync_now.set()
        try:
            async with asyncio.timeout(budget):
                await self.sync.handed_over.wait()
            log.info("handed over: the live replicas ping this replica's share")
        except TimeoutError:
            log.warning("stopping after %.1fs without a confirmed handover: the others take "
                        "this replica's share once they sync", budget)

    async def run(self, on_stop: Callable[[float], None] | None = None) -> int:
        """Start, wait for SIGTERM/SIGINT, stop. The process exit code.

        `on_stop(grace_s)` is called as the stop begins (the entry point arms a last-resort
        exit with it, for a stop that overruns its grace despite every bound here)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        crashed = asyncio.create_task(self._watch_tasks())
        await self.stopping.wait()
        if on_stop is not None:
            on_stop(self.settings.shutdown_grace_ms / 1000)
        crashed.cancel()
        await asyncio.gather(crashed, return_exceptions=True)
        ok = await self.stop()
        return 0 if ok and not self.crashed else 1

    async def _watch_tasks(self) -> None:
        """A loop that dies is a bug: log it and stop (flushing) rather than limp on."""
        done, _ = await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s loop crashed", task.get_name(), exc_info=task.exception())
            else:
                log.error("%s loop ended on its own", task.get_name())
        self.crashed = True  # the exit code says so: a restart, and a look at the logs
        self.stopping.set()

    # Sync --------------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        interval = self.settings.poll_interval_ms / 1000
        api_checked = False
        while True:
            self.sync_heartbeat = time.monotonic()
            try:
                if not api_checked:
                    check_api_version(await self.store.api_version(), API_VERSION)
                    api_checked = True
                await self.sync_once()
            except StoreMisconfigured as exc:
                self.sync_error = str(exc)
                self.metrics.sync_errors.inc()
                self._say(logging.ERROR, "misconfigured", "cannot sync jobs: %s", exc)
                raise_if_cancelling()
            except StoreError as exc:
                self.sync_error = str(exc)
                self.metrics.sync_errors.inc()
                self._say(logging.WARNING, "unavailable",
                          "sync failed, keeping the %d jobs known: %s",
                          len(self.scheduler.jobs), exc)
                raise_if_cancelling()
            self.progress.notify()
            self._sync_now.clear()
            # Leaving: sync often, so the handover is seen as soon as it happens.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval, 0.25) if self.sync.leaving
                                         else interval):
                    await self._sync_now.wait()

    async def sync_once(self) -> None:
        await self.sync.once()
        if not self.first_sync_done or self.sync_error:
            log.info("synced: %d jobs owned", len(self.scheduler.jobs))
        self.first_sync_done = True
        self.sync_error = None
        self.last_sync_ok = time.monotonic()
        self.metrics.syncs.inc()
        self.metrics.owned_jobs.set(len(self.scheduler.jobs))
        self.metrics.last_sync.set(time.time())

    @property
    def replica_counts(self) -> list[int]:
        return self.sync.replica_counts

    # Probes ------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self.stopping.is_set():
            reasons.append("shutting down")
        if not self.first_sync_done:
            reasons.append("no successful job sync yet")
        if self.sync_error:
            reasons.append(f"job sync failing: {self.sync_error}")
        if self.recorder.last_error:
            reasons.append(f"sample writes failing: {self.recorder.last_error}")
        return not reasons, {"ready": not reasons, "reasons": reasons}

    def health(self) -> tuple[bool, dict[str, Any]]:
        s = self.settings
        now = time.monotonic()
        db_wait = 2 * s.db_timeout_ms / 1000
        limits = {
            "scheduler": (self.scheduler.heartbeat, _STUCK_S),
            "sync": (self.sync_heartbeat, s.poll_interval_ms / 1000 + db_wait + _STUCK_S),
            "recorder": (self.recorder.heartbeat, s.batch_flush_interval_ms / 1000
                         + s.retry_max_backoff_ms / 1000 + db_wait + _STUCK_S),
        }
        stuck = [
            name for name, (beat, limit) in limits.items()
            if now - beat > limit or (name in self._tasks and self._tasks[name].done()
                                      and not self.stopping.is_set())
        ]
        body = {
            "status": "stuck" if stuck else "ok",
            "stuck_loops": stuck,
            "version": __version__,
            "replica": f"{s.replica_id}/{'+'.join(map(str, self.sync.replica_counts))}",
            "owned_jobs": len(self.scheduler.jobs),
            "pings_in_flight": self.prober.in_flight,
            "pings_pending": self.prober.pending,
            "buffered_samples": self.recorder.buffered,
            "last_good_sync_age_s": (
                None if self.last_sync_ok is None else round(now - self.last_sync_ok, 3)),
        }
        return not stuck, body
