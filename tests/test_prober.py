"""The prober's contract: every started ping ends in exactly one sample, whatever the
pinger does (answers twice, raises, never answers)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from uuid import UUID, uuid4

from poller.metrics import Metrics
from poller.models import Job, SampleStatus
from poller.pingers import Done, PingResult
from poller.prober import Prober
from poller.recorder import Recorder
from poller.scheduler import JobState
from tests.support.fakes import NullStore


class MisbehavingPinger:
    """Answers per address: 'twice', 'raise', 'never', or once with success."""

    def __init__(self) -> None:
        self.submitted = 0
        self.held: list[Done] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def submit(self, ip: str, done: Done) -> None:
        self.submitted += 1
        loop = asyncio.get_running_loop()
        if ip == "127.0.0.2":  # twice
            loop.call_soon(done, PingResult(SampleStatus.SUCCESS, 1.0))
            loop.call_soon(done, PingResult(SampleStatus.MISSED))
        elif ip == "127.0.0.3":
            raise OSError("socket gone")
        elif ip == "127.0.0.4":
            self.held.append(done)  # never answered
        else:
            loop.call_soon(done, PingResult(SampleStatus.SUCCESS, 1e12))  # no column holds it


async def test_every_ping_ends_in_exactly_one_sample() -> None:
    metrics = Metrics()
    recorder = Recorder(NullStore(), metrics, batch_size=10_000, flush_interval_s=60,
                        max_buffered=10_000, max_backoff_s=1)
    pinger = MisbehavingPinger()
    prober = Prober(pinger, recorder, metrics, concurrency=20, timeout_s=0.2)
    states = [JobState(Job(uuid4(), ip, 1, 60, datetime.now(UTC)), ip, None, 0)
              for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")]
    for k in range(3):
        for state in states:
            prober.on_slot(state, k, time.time())
    async with asyncio.timeout(10):
        await prober.idle()
    assert pinger.submitted == 12 and len(pinger.held) == 3
    assert recorder.buffered == 12  # one sample per slot, no more, no less
    statuses: dict[UUID, set[SampleStatus]] = {s.job_id: set() for s in recorder._buffer}
    for s in recorder._buffer:
        statuses[s.job_id].add(s.status)
    by_ip = {st.ip: statuses[st.id] for st in states}
    assert by_ip == {"127.0.0.2": {SampleStatus.SUCCESS},  # the second answer ignored
                     "127.0.0.3": {SampleStatus.SYSTEM_ERROR},  # submit raised
                     "127.0.0.4": {SampleStatus.SYSTEM_ERROR},  # the watchdog closed it
                     "127.0.0.5": {SampleStatus.SYSTEM_ERROR}}  # implausible RTT
    pinger.held[0](PingResult(SampleStatus.SUCCESS, 1.0))  # far too late: ignored
    assert recorder.buffered == 12 and all(s.in_flight == 0 for s in states)
    await prober.drain(1)
