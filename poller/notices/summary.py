"""The verdict of a completed job, from its summary: the app's completion email rules.

PASS when packet loss (missed / (success + missed)) is at most 2 % and the p95 RTT at most
100 ms (or no RTT was measured); a warning when system errors (the poller's failures, not
the target's) exceed 5 % of the samples. A job with no success and no miss measured
nothing: it does not pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import JobSummary

LOSS_LIMIT = 0.02
P95_LIMIT_MS = 100.0
SYSTEM_ERROR_WARNING = 0.05


@dataclass(frozen=True)
class Verdict:
    packet_loss: float | None  # None: no success and no miss
    passed: bool
    warning: str | None


def verdict(s: JobSummary) -> Verdict:
    measured = s.success + s.missed
    loss = s.missed / measured if measured else None
    passed = (loss is not None and loss <= LOSS_LIMIT
              and (s.p95_rtt_ms is None or s.p95_rtt_ms <= P95_LIMIT_MS))
    warning = None
    if s.total and s.system_error / s.total > SYSTEM_ERROR_WARNING:
        warning = (f"{s.system_error} of {s.total} samples "
                   f"({100 * s.system_error / s.total:.1f} %) are system errors: the "
                   "monitoring itself failed for them, so the figures above cover less "
                   "of the job than it asked for")
    return Verdict(loss, passed, warning)
