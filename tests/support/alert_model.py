"""Reference models of the app's rules, written the plain way (one sample at a time, in
sequence order) to check the set-based SQL against."""

from __future__ import annotations

import math
from collections.abc import Sequence

# A job's samples by sequence number: status, or None for a slot with no sample (a gap).
Statuses = Sequence[str | None]


def transitions(statuses: Statuses, state: str = "ok") -> tuple[list[tuple[str, int]], str]:
    """After each sample: the last 5 samples that are neither system errors nor gaps all
    `missed` while ok → offline; all `success` while offline → recovery. The transitions
    (type, sequence number) and the final state."""
    last: list[str] = []
    out = []
    for k, status in enumerate(statuses):
        if status is None or status == "system_error":
            continue
        last = [*last, status][-5:]
        if len(last) == 5 and set(last) == {"missed"} and state == "ok":
            state = "offline_alerted"
            out.append(("offline", k))
        elif len(last) == 5 and set(last) == {"success"} and state == "offline_alerted":
            state = "ok"
            out.append(("recovery", k))
    return out, state


def summary(statuses: Statuses, rtts: Sequence[float | None]) -> dict[str, object]:
    """The completion summary as the app's email counts it."""
    present = [(s, r) for s, r in zip(statuses, rtts, strict=True) if s is not None]
    ok_rtts = sorted(r for s, r in present if s == "success" and r is not None)
    runs, run = [], 0
    for s, _ in present:
        if s == "missed":
            run += 1
        elif s == "success":
            if run:
                runs.append(run)
            run = 0
    if run:
        runs.append(run)
    return {
        "total": len(present),
        "success": sum(s == "success" for s, _ in present),
        "missed": sum(s == "missed" for s, _ in present),
        "system_error": sum(s == "system_error" for s, _ in present),
        "avg_rtt_ms": round(sum(ok_rtts) / len(ok_rtts), 2) if ok_rtts else None,
        "max_rtt_ms": max(ok_rtts) if ok_rtts else None,
        # nearest rank: the smallest value with at least 95 % of the values at or below it
        "p95_rtt_ms": ok_rtts[math.ceil(0.95 * len(ok_rtts)) - 1] if ok_rtts else None,
        "outages": sum(r >= 5 for r in runs),
        "longest_miss_streak": max(runs, default=0),
    }
