"""Plays the StatefulSet controller with real poller processes, for whole-fleet tests.

`FleetRunner` watches the StatefulSet in kmock and starts or stops `python -m poller`
processes (HOSTNAME = pod name, so REPLICA_ID comes from the ordinal) to match
spec.replicas, and reports readyReplicas (a pod is ready after its first good sync). When
the pod template changes it does what the RollingUpdate strategy does: one pod at a time,
highest ordinal first, SIGTERM, wait for the exit, a pause for the replacement, the new pod,
wait until it is ready, the next (the processes keep the runner's environment: the template
only says when to roll). It records when at least one pod was serving, and the pings and
inserts each process reports when it stops.

`RollingRunner` is the comparison without handover: the fleet size is REPLICA_COUNT in
the pod environment, so a resize restarts every pod, one at a time, as a StatefulSet
rolling update does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field

from tests.support.kube_api import NS, STS, Cluster
from tests.support.processes import PollerProcess

_STOPPED = re.compile(r"(\d+) pings made, (\d+) samples inserted")


@dataclass
class Counters:
    pings: int = 0
    inserted: int = 0
    # [start, end) intervals during which at least one pod had synced and was running.
    serving: list[list[float]] = field(default_factory=list)

    def serving_at(self, t: float, margin: float) -> bool:
        return any(start + margin <= t <= end - margin for start, end in self.serving)


class _Pods:
    """Poller processes by ordinal, with the serving timeline."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name, self.env = name, env
        self.procs: dict[int, PollerProcess] = {}
        self.ready: set[int] = set()
        self.counters = Counters()
        self._watchers: set[asyncio.Task[None]] = set()

    def _mark(self) -> None:
        serving = bool(self.ready)
        timeline = self.counters.serving
        if serving and (not timeline or timeline[-1][1] != float("inf")):
            timeline.append([time.time(), float("inf")])
        elif not serving and timeline and timeline[-1][1] == float("inf"):
            timeline[-1][1] = time.time()

    async def start(self, ordinal: int, extra: dict[str, str] | None = None) -> None:
        proc = PollerProcess({**self.env, **(extra or {}), "HOSTNAME": f"{self.name}-{ordinal}"})
        self.procs[ordinal] = proc
        await proc.start()
        task = asyncio.create_task(self._await_ready(ordinal, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _await_ready(self, ordinal: int, proc: PollerProcess) -> None:
        await proc.synced(timeout=60)
        if self.procs.get(ordinal) is proc:
            self.ready.add(ordinal)
            self._mark()

    async def stop(self, ordinal: int) -> None:
        proc = self.procs.pop(ordinal)
        self.ready.discard(ordinal)
        self._mark()
        proc.terminate()
        assert await proc.wait(timeout=60) == 0, proc.log[-2000:]
        for line in proc.lines:
            if m := _STOPPED.search(line):
                self.counters.pings += int(m.group(1))
                self.counters.inserted += int(m.group(2))

    async def close(self) -> None:
        for ordinal in list(self.procs):
            await self.stop(ordinal)
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


class FleetRunner(_Pods):
    def __init__(self, cluster: Cluster, name: str, env: dict[str, str],
                 replace_s: float = 1.0) -> None:
        super().__init__(name, {**env, "FLEET_NAME": f"{NS}/{name}"})
        self.cluster = cluster
        self.replace_s = replace_s  # a pod replaced: scheduled, pulled, started
        self.revisions: dict[int, str] = {}  # the template each pod was started from
        self.replaced = 0  # pods replaced by rolling updates

    async def run(self) -> None:
        while True:
            await self._reconcile()
            await self.cluster.emu.progress.next()

    async def _reconcile(self) -> None:
        sts = self.cluster.get(STS, self.name)
        if sts is None:
            return
        want = int(sts["spec"]["replicas"])
        revision = hashlib.sha256(json.dumps(sts["spec"]["template"], sort_keys=True)
                                  .encode()).hexdigest()
        for ordinal in range(want):  # Parallel pod management: all at once
            if ordinal not in self.procs:
                await self.start(ordinal)
                self.revisions[ordinal] = revision
        for ordinal in [o for o in self.procs if o >= want]:
            await self.stop(ordinal)
        for ordinal in sorted((o for o in self.procs if self.revisions[o] != revision),
                              reverse=True):
            await self.stop(ordinal)
            await self._report(want)
            await asyncio.sleep(self.replace_s)  # stands for the pod replacement
            await self.start(ordinal)
            self.revisions[ordinal] = revision
            await self.procs[ordinal].synced(timeout=60)
            self.ready.add(ordinal)
            self._mark()
            self.replaced += 1
        await self._report(want)

    async def _report(self, want: int) -> None:
        sts = self.cluster.get(STS, self.name) or {}
        status = sts.get("status") or {}
        if status.get("readyReplicas") != len(self.ready) or status.get("replicas") != want:
            await self.cluster.set_statefulset_status(self.name, want, len(self.ready))


class RollingRunner(_Pods):
    """No operator, no topology: REPLICA_COUNT in the environment, rolling restarts.

    Kubernetes takes seconds to replace a pod (the old one terminates, the new one is
    scheduled, pulled, started); `replace_s` stands for that pause, which processes on one
    machine would not have by themselves.
    """

    def __init__(self, name: str, env: dict[str, str], replace_s: float = 2.0) -> None:
        super().__init__(name, env)
        self.replace_s = replace_s

    async def resize(self, count: int) -> None:
        old = sorted(self.procs)
        for ordinal in [o for o in old if o >= count]:
            await self.stop(ordinal)
        # Rolling update, highest ordinal first, each pod replaced once it is gone.
        for ordinal in sorted((o for o in old if o < count), reverse=True):
            await self.stop(ordinal)
            await asyncio.sleep(self.replace_s)  # stands for the pod replacement, see above
            await self.start(ordinal, {"REPLICA_COUNT": str(count)})
            await self.procs[ordinal].synced(timeout=60)
        for ordinal in range(count):
            if ordinal not in self.procs:
                await self.start(ordinal, {"REPLICA_COUNT": str(count)})
        for ordinal in range(count):
            await self.procs[ordinal].synced(timeout=60)
