"""Turns due slots into samples: bound the pings in flight, ping, classify, hand over.

The scheduler calls `on_slot` from its loop. At most CONCURRENCY pings are out; further
slots wait in a FIFO and start as answers come back. A slot that could not even start
within the ping timeout of its due time (the poller is overloaded) is recorded as
`system_error` instead of piling up without bound. No task per ping: the pinger calls
back (see pingers/__init__.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
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
        self._limit = concurrency
        self._timeout = timeout_s
        self._clock = clock
        self._queue: deque[tuple[JobState, int, float]] = deque()
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self.in_flight = 0
        # Per-ping metric updates are the bulk of the pipeline's own CPU: bind the labelled
        # children once, and let gauges read state when scraped instead of on every ping.
        self._count = {s: metrics.pings.labels(s.value) for s in SampleStatus}
        metrics.in_flight.set_function(lambda: self.in_flight)

    @property
    def pending(self) -> int:
        """Pings dispatched and not yet recorded (waiting for a slot or in flight)."""
        return self.in_flight + len(self._queue)

    def on_slot(self, state: JobState, slot: int, due: float) -> None:
        if not self._accepting:
            return
        state.in_flight += 1
        if state.ip is None:
            self._finish(state, slot, self._clock(),
                         system_error(f"invalid target address {state.job.target_ip!r}"))
        elif self.in_flight < self._limit:
            self._start(state, slot, due)
        else:
            self._queue.append((state, slot, due))
            self._idle.clear()

    def on_expired(self, state: JobState) -> None:
        if state.in_flight:
            state.complete_when_idle = True  # the last ping is still out
        else:
            self._recorder.request_completion(state.job.id)

    def _start(self, state: JobState, slot: int, due: float) -> None:
        started = self._clock()
        self._metrics.lateness.observe(max(0.0, started - due))
        if started - due > self._timeout:
            self._finish(state, slot, started,
                         system_error("ping not started within the ping timeout"))
            return
        self.in_flight += 1
        self._idle.clear()
        assert state.ip is not None
        self._pinger.submit(state.ip, lambda result: self._done(state, slot, started, result))

    def _done(self, state: JobState, slot: int, started: float, result: PingResult) -> None:
        self.in_flight -= 1
        self._finish(state, slot, started, result)
        while self._queue and self.in_flight < self._limit:
            self._start(*self._queue.popleft())
        if not self.in_flight and not self._queue:
            self._idle.set()

    def _finish(self, state: JobState, slot: int, started: float, result: PingResult) -> None:
        jitter = None
        if result.status is SampleStatus.SUCCESS and result.rtt_ms is not None:
            if state.last_rtt is not None:
                jitter = abs(result.rtt_ms - state.last_rtt)
            state.last_rtt = result.rtt_ms
            self._metrics.rtt.observe(result.rtt_ms / 1000)
        self._count[result.status].inc()
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
        state.in_flight -= 1
        if state.in_flight == 0 and state.complete_when_idle:
            state.complete_when_idle = False
            self._recorder.request_completion(state.job.id)

    async def idle(self) -> None:
        """Wait until no ping is out or waiting."""
        await self._idle.wait()

    async def drain(self, timeout_s: float) -> int:
        """Start no new pings; wait for the ones out. Returns how many were abandoned."""
        self._accepting = False
        for state, _, _ in self._queue:  # never started: no ping, no sample
            state.in_flight -= 1
        self._queue.clear()
        if self.in_flight:
            try:
                async with asyncio.timeout(max(0.0, timeout_s)):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("shutdown: abandoned %d pings still out after %.1fs",
                            self.in_flight, timeout_s)
        return self.in_flight
