"""How many pollers a fleet wants, as a pure function
(docs/operator.md, "The PollerFleet operator").

    desired = clamp(ceil(running_jobs / jobsPerReplica), minReplicas, maxReplicas)

Up at once. Down only to the highest recommendation of the stabilization window, as the
Kubernetes HPA does: a dip must hold for the whole window before the fleet shrinks. With
minReplicas 0 and nothing running, the fleet goes to zero (after the window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .spec import FleetSpec


@dataclass(frozen=True)
class Decision:
    desired: int
    recommendation: int
    # (monotonic time, recommendation) within the stabilization window, newest last.
    history: tuple[tuple[float, int], ...]


def recommend(running_jobs: int, spec: FleetSpec) -> int:
    wanted = math.ceil(max(0, running_jobs) / spec.jobs_per_replica)
    return max(spec.min_replicas, min(spec.max_replicas, wanted))


def decide(running_jobs: int, current: int, spec: FleetSpec,
           history: tuple[tuple[float, int], ...], now: float) -> Decision:
    """The size to run now, given the recommendations of the last window.

    With no history (a new fleet, a lost status), the current size counts as recommended
    just now, so nothing shrinks before a full window of evidence.
    """
    rec = recommend(running_jobs, spec)
    window = spec.scale_down_stabilization_s
    if not history:
        history = ((now, current),)
    kept = (*((t, r) for t, r in history if now - t < window), (now, rec))
    desired = rec if rec >= current else min(current, max(r for _, r in kept))
    return Decision(desired=desired, recommendation=rec, history=kept)
