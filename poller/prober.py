"""Turns due slots into samples: bound the pings in flight, ping, classify, hand over.

The scheduler calls `on_slot` from its loop. At most CONCURRENCY pings are out; further
slots wait in a FIFO and start as answers come back. A slot that could not even start
within the ping timeout of its due time (the poller is overloaded) is recorded as
`system_error` instead of piling up without bound; one the scheduler skipped after a
stall is only counted.
No task per ping: the pinger calls back (see pingers/__init__.py).

Every started ping ends in exactly one sample, enforced here rather than trusted to the
pinger: a ping is a `_Ping` that closes on its first answer and ignores any later one; a
pinger that raises in `submit` gives a `system_error`; one that never calls back is timed
out by a watchdog (PING_TIMEOUT_MS plus a grace), so a broken answer can never hold a
CONCURRENCY slot for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from .metrics import Metrics
from .models import MAX_RTT_MS, Sample, SampleStatus
from .pingers import Pinger, PingResult, system_error
from .recorder import Recorder
from .scheduler import JobState

log = logging.getLogger("poller.prober")

_WATCHDOG_GRACE_S = 1.0  # beyond the ping timeout, before a ping with no answer is closed
_SWEEP_EVERY_S = 1.0


class _Ping:
    """One ping out: the callback handed to the pinger. Closes once."""

    __slots__ = ("deadline", "open", "prober", "slot", "started", "state")

    def __init__(self, prober: Prober, state: JobState, slot: int, started: float,
                 deadline: float) -> None:
        self.prober, self.state, self.slot = prober, state, slot
        self.started, self.deadline, self.open = started, deadline, True

    def __call__(self, result: PingResult) -> None:
        if self.open:
            self.open = False
            self.prober._done(self, result)
        else:
            self.prober._late_answers += 1


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
        # Pings out, oldest first: deadlines grow in submit order (one timeout for all).
        self._out: deque[_Ping] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._late_answers = 0
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self.in_flight = 0
        # Per-ping metric updates are the bulk of the pipeline's own CPU: plain ints counted
        # here, and gauges that read state when scraped instead of on every ping.
        self._count = metrics.pings.counts
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
            self._finish(state, slot, self._clock(), system_error(state.problem or "no target"))
        elif self.in_flight < self._limit:
            self._start(state, slot, due)
        else:
            self._queue.append((state, slot, due))
            self._idle.clear()

    def on_skipped(self, state: JobState, slot: int, due: float) -> None:
        """A slot passed over after a stall: neither pinged nor recorded. Another replica
        may have pinged it while this one was stalled (failover): a row written here could
        land before that one and hide a real result behind a `system_error`."""
        self._metrics.skipped.inc()

    def on_expired(self, state: JobState) -> None:
        if state.in_flight:
            state.complete_when_idle = True  # the last ping is still out
        else:
            self._recorder.request_completion(state.id)

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
        ping = _Ping(self, state, slot, started,
                     time.monotonic() + self._timeout + _WATCHDOG_GRACE_S)
        self._out.append(ping)
        if self._watchdog is None:
            self._arm_watchdog()
        try:
            self._pinger.submit(state.ip, ping)
        except Exception as exc:
            log.exception("the pinger failed to start a ping")
            # Never from inside submit's caller: _done starts queued pings, and a pinger that
            # always raises would otherwise recurse once per queued slot.
            asyncio.get_running_loop().call_soon(
                ping, system_error(f"pinger error: {exc.__class__.__name__}"))

    def _done(self, ping: _Ping, result: PingResult) -> None:
        self.in_flight -= 1
        self._finish(ping.state, ping.slot, ping.started, result)
        while self._queue and self.in_flight < self._limit:
            self._start(*self._queue.popleft())
        if not self.in_flight and not self._queue:
            self._idle.set()

    def _arm_watchdog(self) -> None:
        # At least once a second, so answered pings leave the deque (and memory) soon.
        delay = _SWEEP_EVERY_S
        if self._out:
            delay = min(delay, max(0.01, self._out[0].deadline - time.monotonic()))
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Close pings the pinger never answered; drop answered ones from the front."""
        self._watchdog = None
        now = time.monotonic()
        while self._out and (not self._out[0].open or self._out[0].deadline <= now):
            ping = self._out.popleft()
            if ping.open:
                log.error("job %s slot %d: the pinger gave no answer within the ping timeout",
                          ping.state.id, ping.slot)
                ping(system_error("the pinger gave no answer"))
        if self._out and self._watchdog is None:
            self._arm_watchdog()

    def _finish(self, state: JobState, slot: int, started: float, result: PingResult) -> None:
        status, rtt = result.status, result.rtt_ms
        if status is SampleStatus.SUCCESS and not (rtt is not None and 0 < rtt <= MAX_RTT_MS):
            result = system_error(f"implausible round-trip time {rtt!r} ms")
            status, rtt = result.status, None
        jitter = None
        if status is SampleStatus.SUCCESS:
            assert rtt is not None
            if state.last_rtt is not None:
                jitter = abs(rtt - state.last_rtt)
            state.last_rtt = rtt
            self._metrics.rtt.observe(rtt / 1000)
        self._count[status] += 1
        if status is SampleStatus.SYSTEM_ERROR:
            log.debug("job %s slot %d: system_error: %s", state.id, slot, result.detail)
        # job_id, sequence_number, status, rtt_ms, jitter_ms, recorded_at
        self._recorder.add(Sample(state.id, slot, status, rtt, jitter, started))
        state.in_flight -= 1
        if state.in_flight == 0 and state.complete_when_idle:
            state.complete_when_idle = False
            self._recorder.request_completion(state.id)

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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        return self.in_flight
