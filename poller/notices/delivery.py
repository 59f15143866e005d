"""The delivery loop: claim due notices from the outbox, send each to every configured
channel that has not taken it yet, and record the outcome.

Any replica with a channel may deliver: a claim (FOR UPDATE SKIP LOCKED, with a lease) is
held by one process, so two replicas never send the same notice at once. A notice is sent
again only if its process dies between a channel accepting it and the outcome being
recorded (the lease then lapses); the Message-ID and Idempotency-Key let a receiver drop
that repeat. Failures are retried with exponential backoff up to NOTIFY_MAX_ATTEMPTS;
a permanent failure (a refused recipient, a 4xx from the webhook) ends it at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from ..metrics import Metrics
from ..models import Notice
from ..progress import Progress
from ..settings import Settings
from ..store import NoticeStore, StoreError, raise_if_cancelling
from . import Channel, DeliveryError

log = logging.getLogger("poller.notices")

CLAIM_LIMIT = 10


class Deliverer:
    def __init__(self, store: NoticeStore, channels: list[Channel], settings: Settings,
                 metrics: Metrics) -> None:
        self.store = store
        self.channels = channels
        self.settings = settings
        self.metrics = metrics
        self.claimer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        timeout_s = settings.notify_timeout_ms / 1000
        # Sends of one claim run side by side, each bounded: the lease outlasts them.
        self.lease_s = int(len(channels) * timeout_s + 30)
        self._stop = asyncio.Event()
        self.progress = Progress()  # notified after every claim and its deliveries
        self._inflight: asyncio.Future[list[None]] | None = None

    def stop(self) -> None:
        """Finish the claim in hand, claim no more."""
        self._stop.set()

    async def run(self) -> None:
        for channel in self.channels:
            await channel.start()
        try:
            while not self._stop.is_set():
                delivered = await self.once()
                if not delivered:
                    try:
                        async with asyncio.timeout(self.settings.notify_interval_ms / 1000):
                            await self._stop.wait()
                    except TimeoutError:
                        pass
        finally:
            if self._inflight is not None and not self._inflight.done():
                # Cancelled mid-claim: let the sends in hand record their outcome (each is
                # bounded), or a notice a channel took would be sent again.
                await asyncio.wait({self._inflight},
                                   timeout=self.settings.notify_timeout_ms / 1000 + 2)
            for channel in self.channels:
                await channel.close()

    async def once(self) -> int:
        """One claim and its deliveries; how many notices it held."""
        try:
            claim = await self.store.claim_notices(self.claimer, CLAIM_LIMIT, self.lease_s)
        except StoreError as exc:
            raise_if_cancelling()
            log.warning("cannot claim notices: %s", exc)
            return 0
        self.metrics.outbox_pending.set(claim.pending - len(claim.notices))
        # Shielded: a stop in the middle still records what was sent (run() waits for it).
        self._inflight = asyncio.gather(*(self.deliver(n) for n in claim.notices))
        await asyncio.shield(self._inflight)
        self.progress.notify()
        return len(claim.notices)

    async def deliver(self, notice: Notice) -> None:
        done: list[str] = []
        errors: list[str] = []
        permanent = True
        for channel in self.channels:
            if channel.name in notice.done_channels:
                continue
            try:
                async with asyncio.timeout(self.settings.notify_timeout_ms / 1000 + 1):
                    await channel.send(notice)
            except (DeliveryError, TimeoutError) as exc:
                self.metrics.notice_failures.labels(channel.name).inc()
                errors.append(f"{channel.name}: {exc or 'timed out'}")
                permanent = permanent and getattr(exc, "permanent", False)
                continue
            except Exception as exc:
                # A notice the channel cannot even build (a bug, or data no message can
                # carry): it would fail the same way again. One notice, not the loop.
                log.exception("notice %d (%s, job %s): %s cannot send it", notice.id,
                              notice.kind, notice.job.id, channel.name)
                self.metrics.notice_failures.labels(channel.name).inc()
                errors.append(f"{channel.name}: {type(exc).__name__}: {exc}")
                continue
            done.append(channel.name)
            self.metrics.notices_sent.labels(channel.name).inc()
        error = "; ".join(errors) or None
        s = self.settings
        retry_s = min(s.notify_retry_max_backoff_ms / 1000,
                      s.notify_interval_ms / 1000 * 2 ** (notice.attempts - 1))
        max_attempts = notice.attempts if error and permanent else s.notify_max_attempts
        try:
            status = await self.store.finish_notice(notice.id, self.claimer, done, error,
                                                    retry_s, max_attempts)
        except StoreError as exc:
            log.warning("notice %d (%s, job %s): outcome not recorded, it will be retried "
                        "when the claim lapses: %s", notice.id, notice.kind, notice.job.id, exc)
            return
        if status == "failed":
            self.metrics.notices_given_up.inc()
            log.error("notice %d (%s, job %s) failed for good after %d attempts: %s",
                      notice.id, notice.kind, notice.job.id, notice.attempts, error)
        elif status is None:
            log.warning("notice %d: the claim lapsed before the outcome was recorded",
                        notice.id)
        elif error:
            log.warning("notice %d (%s, job %s) attempt %d failed, retrying in %.1fs: %s",
                        notice.id, notice.kind, notice.job.id, notice.attempts, retry_s,
                        error)
        else:
            log.info("notice %d (%s, job %s) sent by %s", notice.id, notice.kind,
                     notice.job.id, ", ".join(done))
