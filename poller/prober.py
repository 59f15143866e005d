"""Turns due slots into samples: bound the pings in flight, ping, classify, hand over.

The scheduler calls `on_slot` (synchronously, from its loop); each slot becomes one owned
task. A ping that could not even start within the ping timeout of its due time (the
poller is overloaded) is recorded as `system_error` instead of piling up without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .metrics import Metrics
from .models import Sample, SampleStatus
from .pingers import Pinger, PingResult, system_error
from .recorder import Recorder
from .scheduler import JobState

log = logging.getLogger("poller.prober")


class Prober:
    def __init__(
        self,
        pinger: Pinger,
        recorder: Recorder,
        metrics: Metrics,
        *,
        concurrency: int,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pinger = pinger
        self._recorder = recorder
        self._metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = timeout_s
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = True
        self.in_flight = 0

    @property
    def pending(self) -> int:
        """Pings dispatched and not yet recorded (waiting for a slot or in flight)."""
        return len(self._tasks)

    def on_slot(self, state: JobState, slot: int, due: float) -> None:
        if not self._accepting:
            return
        state.in_flight += 1
        task = asyncio.create_task(self._probe(state, slot, due), name=f"ping-{slot}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_expired(self, state: JobState) -> None:
        if state.in_flight:
            state.complete_when_idle = True  # the last ping is still out
        else:
            self._recorder.request_completion(state.job.id)

    async def _probe(self, state: JobState, slot: int, due: float) -> None:
        try:
            if state.ip is None:
                started = self._clock()
                result = system_error(f"invalid target address {state.job.target_ip!r}")
            else:
                async with self._slots:
                    started = self._clock()
                    self._metrics.lateness.observe(max(0.0, started - due))
                    if started - due > self._timeout:
                        result = system_error("ping not started within the ping timeout")
                    else:
                        self.in_flight += 1
                        self._metrics.in_flight.set(self.in_flight)
                        try:
                            result = await self._pinger.ping(state.ip)
                        finally:
                            self.in_flight -= 1
                            self._metrics.in_flight.set(self.in_flight)
            self._record(state, slot, started, result)
        finally:
            state.in_flight -= 1
            if state.in_flight == 0 and state.complete_when_idle:
                state.complete_when_idle = False
                self._recorder.request_completion(state.job.id)

    def _record(self, state: JobState, slot: int, started: float, result: PingResult) -> None:
        jitter = None
        if result.status is SampleStatus.SUCCESS and result.rtt_ms is not None:
            if state.last_rtt is not None:
                jitter = abs(result.rtt_ms - state.last_rtt)
            state.last_rtt = result.rtt_ms
            self._metrics.rtt.observe(result.rtt_ms / 1000)
        self._metrics.pings.labels(result.status.value).inc()
        if result.status is SampleStatus.SYSTEM_ERROR:
            log.debug("job %s slot %d: system_error: %s", state.job.id, slot, result.detail)
        self._recorder.add(Sample(
            job_id=state.job.id,
            sequence_number=slot,
            status=result.status,
            rtt_ms=result.rtt_ms,
            jitter_ms=jitter,
            recorded_at=datetime.fromtimestamp(started, UTC),
        ))

    async def drain(self, timeout_s: float) -> int:
        """Start no new pings; wait for the ones out. Returns how many were abandoned."""
        self._accepting = False
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout_s))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("shutdown: abandoned %d pings still out after %.1fs", len(pending),
                        timeout_s)
        return len(pending)
