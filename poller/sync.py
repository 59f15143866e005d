"""The sync stage: store → scheduler (docs/architecture.md, "Incremental sync").

One `once()` per POLL_INTERVAL_MS (the service's sync loop calls it): the changes since the
last sync's cursor, or a full read of the owned buckets when one is due, taken up by the
scheduler (`apply` / `replace`). In a fleet (FLEET_NAME) the same call is the replica's
heartbeat and brings the fleet's membership: the topology (replica counts), the live
replicas, the buckets this replica owns, and whether the others took over its share once
it said it is leaving (docs/architecture.md, "Failover").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from . import __version__
from .metrics import Metrics
from .partition import owned_buckets
from .progress import Progress
from .scheduler import Scheduler
from .settings import Settings
from .store import Applied, Changes, StoreError, SyncStore, pages

log = logging.getLogger("poller")  # the service's logger: its lines read as they always did


class Sync:
    def __init__(self, settings: Settings, store: SyncStore, scheduler: Scheduler,
                 metrics: Metrics, progress: Progress) -> None:
        self.settings = s = settings
        self.store, self.scheduler, self.metrics, self.progress = (store, scheduler, metrics,
                                                                   progress)
        self.replica_counts = [s.replica_count]
        self.applied = Applied()  # the fleet topology the scheduler has taken up
        # Where the last sync left off: its cursor, the buckets it covered, when the last
        # full read was (monotonic).
        self._cursor: int | None = None
        self._buckets: tuple[int, ...] = ()
        self._full_at: float | None = None
        # Without a fleet the buckets never change: REPLICA_ID's share of REPLICA_COUNT (in a
        # fleet each sync brings them).
        self._static_buckets = () if s.fleet_name else tuple(
            sorted(owned_buckets(s.replica_id, [s.replica_count])))
        self.live: tuple[int, ...] = ()  # the fleet's live replicas, as of the last sync
        self.leaving = False  # stopping in a fleet: others are taking this replica's share
        self.handed_over = asyncio.Event()  # … and have, as far as the database has seen

    @property
    def position(self) -> tuple[tuple[int, ...], int | None]:
        """The buckets and the cursor the next sync starts from."""
        return self._buckets, self._cursor

    def resync(self) -> None:
        """Make the next sync a full read."""
        self._full_at = None

    async def once(self) -> None:
        s = self.settings
        # The cursor of the last sync, unless a full read is due
        # (docs/architecture.md, "Incremental sync").
        cursor = self._cursor
        if self._full_at is None or time.monotonic() - self._full_at > s.sync_full_interval_s:
            cursor = None
        if s.fleet_name:
            # The topology comes with the changes, and this sync is our heartbeat: it
            # reports the topology applied by the previous sync, never the one served now.
            synced = await self.store.fleet_sync(s.fleet_name, s.replica_id, self.applied,
                                                 self.leaving, len(self.scheduler.jobs),
                                                 __version__, s.sync_page_size, cursor,
                                                 self._buckets)
            if list(synced.counts) != self.replica_counts:
                log.info("topology %s (epoch %d): replica %d now owns its share under it",
                         "+".join(map(str, synced.counts)), synced.epoch, s.replica_id)
                self.replica_counts = list(synced.counts)
            if synced.live != self.live:
                log.info("live replicas: %s (failover after %ds of silence); the buckets of "
                         "the others are shared among them", ",".join(map(str, synced.live))
                         or "none", synced.failover_s)
                self.live = synced.live
            await self._take_up(synced.changes, synced.buckets)
            self.applied = Applied(synced.epoch, synced.counts, synced.now)
            if self.leaving and synced.taken_over:
                self.handed_over.set()
        else:
            changes = await self.store.job_changes(self._static_buckets, cursor,
                                                   s.sync_page_size)
            await self._take_up(changes, self._static_buckets)

    async def _take_up(self, changes: Changes, buckets: tuple[int, ...]) -> None:
        """Apply a sync's changes, or replace the owned set by a full read (its first page
        came with the sync); the cursor is kept only once all of it is applied."""
        if changes.full:
            # Taken up page by page as they arrive: pings go on meanwhile.
            async with self._heartbeats_meanwhile():
                await self.scheduler.replace(pages(lambda after: self.store.jobs_in_buckets(
                    buckets, after, self.settings.sync_page_size), changes))
            self._full_at = time.monotonic()
            self.metrics.full_syncs.inc()
        else:
            await self.scheduler.apply(changes.jobs, changes.gone)
        self._cursor, self._buckets = changes.cursor, buckets

    @contextlib.asynccontextmanager
    async def _heartbeats_meanwhile(self) -> AsyncIterator[None]:
        """Keep this replica's heartbeat going while a full read is taken up.

        The sync is the heartbeat, and the next sync waits for this read: a large read on a
        busy machine (500,000 jobs took 70 s here) would outlast the failover timeout, the
        others would take this replica's buckets (so their own buckets move, so they do a
        full read too) and every replica would end up pinging everything. A heartbeat-only
        sync each POLL_INTERVAL_MS reports the state applied so far, which is the truth:
        what it serves is ignored (one job asked for, dropped). Without a fleet there is no
        heartbeat to keep."""
        if not self.settings.fleet_name:
            yield
            return
        task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _heartbeat_loop(self) -> None:
        s = self.settings
        assert s.fleet_name
        while True:
            await asyncio.sleep(s.poll_interval_ms / 1000)
            try:
                await self.store.fleet_sync(s.fleet_name, s.replica_id, self.applied,
                                            self.leaving, len(self.scheduler.jobs),
                                            __version__, 1, self._cursor, self._buckets)
                self.metrics.heartbeats.inc()
                self.progress.notify()
            except StoreError as exc:  # the read goes on; the next sync reports failures
                log.debug("heartbeat during a full read failed: %s", exc)
