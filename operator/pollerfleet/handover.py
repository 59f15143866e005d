"""Changing a fleet's size without a gap (docs/operator.md, "Resizing without gaps"), as a pure
function of plain data.

The fleet's topology is the list of active replica counts the pollers partition buckets
by; a poller owns a bucket if it owns it under any of them. One step per sync:

    grow N→M:   StatefulSet to M · wait until M pods are ready · publish [N, M]
                · wait until every pod has seen it · publish [M]
    shrink N→M: publish [N, M] · wait until every pod has seen it · publish [M] and
                StatefulSet to M (the leaving pods' buckets are owned under M already)
    to zero:    StatefulSet to 0 (nothing left to ping); from zero: publish [M] first,
                then StatefulSet to M (no pod to hand over from)

Each step is decided from what is observed (topology, StatefulSet, heartbeats), never from
memory, so an operator restart or a pod crash in the middle resumes where it stood.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    publish: tuple[int, ...] | None = None  # publish this topology first …
    scale_to: int | None = None  # … then set the StatefulSet's replicas
    waiting: str = ""  # why nothing happens yet, for status and logs


def all_seen(pods: int, seen: Mapping[int, int], epoch: int) -> bool:
    """Every pod 0…pods-1 has synced at `epoch` or later."""
    return all(seen.get(r, 0) >= epoch for r in range(pods))


def next_step(topology: tuple[int, ...] | None, epoch: int, pods: int, ready: int,
              desired: int, seen: Mapping[int, int]) -> Step:
    """The next step towards `desired` pods; `pods` is the StatefulSet's replicas."""
    if topology is None:
        return Step(publish=(max(desired, 1),), scale_to=desired)
    if len(topology) == 2:
        old, new = topology
        if not all_seen(pods, seen, epoch):
            return Step(waiting=f"handing over {old}→{new}: waiting for every pod to sync")
        return Step(publish=(new,), scale_to=new if new < pods else None)
    (current,) = topology
    if pods == 0:
        if desired == 0:
            return Step()
        return Step(publish=(desired,) if current != desired else None, scale_to=desired)
    if pods > current:  # grown, not yet handed over
        if ready < pods:
            return Step(waiting=f"growing {current}→{pods}: waiting for {pods} ready pods")
        return Step(publish=(current, pods))
    if pods < current:  # pods missing from the topology: take over their buckets now
        return Step(publish=(current, pods))
    if desired == 0:
        return Step(scale_to=0)
    if desired > pods:
        return Step(scale_to=desired)
    if desired < pods:
        return Step(publish=(pods, desired))
    return Step()
