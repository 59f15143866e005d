"""The verdict of a completed job, from its summary: the app's completion email rules.

PASS when packet loss (missed / (success + missed)) is at most 2 % and the p95 RTT at most
100 ms (or no RTT was measured); a warning when system errors (the poller's failures, not
the target's) exceed 5 % of the samples. A job with no success and no miss measured
nothing: it does not pass.

Coverage is the share of the job's slots that have a sample. The app's rules judge only the
samples there are, so a job that was pinged for part of its duration can pass: below 95 %
coverage the verdict warns, as it does for system errors, and the message says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import JobSummary

LOSS_LIMIT = 0.02
P95_LIMIT_MS = 100.0
SYSTEM_ERROR_WARNING = 0.05
COVERAGE_WARNING = 0.95


@dataclass(frozen=True)
class Verdict:
    packet_loss: float | None  # None: no success and no miss
    passed: bool
    coverage: float  # samples / slots, at most 1
    warnings: tuple[str, ...]

    @property
    def warning(self) -> str | None:
        """The warnings as one text (the webhook's `warning`), None when there is none."""
        return " ".join(self.warnings) or None


def verdict(s: JobSummary, slots: int) -> Verdict:
    """`slots`: how many the job asked for (NoticeJob.slot_count)."""
    measured = s.success + s.missed
    loss = s.missed / measured if measured else None
    passed = (loss is not None and loss <= LOSS_LIMIT
              and (s.p95_rtt_ms is None or s.p95_rtt_ms <= P95_LIMIT_MS))
    coverage = min(1.0, s.total / slots) if slots > 0 else 1.0
    warnings = []
    if coverage < COVERAGE_WARNING:
        warnings.append(f"{s.total} of the job's {slots} slots have a sample "
                        f"({100 * coverage:.1f} %): the figures above cover less of the job "
                        "than it asked for.")
    if s.total and s.system_error / s.total > SYSTEM_ERROR_WARNING:
        warnings.append(f"{s.system_error} of {s.total} samples "
                        f"({100 * s.system_error / s.total:.1f} %) are system errors: the "
                        "monitoring itself failed for them, so the figures above cover less "
                        "of the job than it asked for.")
    return Verdict(loss, passed, coverage, tuple(warnings))
