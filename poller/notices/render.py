"""Messages for alerts and completion notices: pure functions from a `Notice` to a
subject, a plain-text and an HTML body, and a webhook payload."""

from __future__ import annotations

import html
import re
from datetime import datetime
from typing import Any
from uuid import UUID

from ..models import Notice
from .summary import LOSS_LIMIT, P95_LIMIT_MS, verdict

_TITLES = {"offline": "OFFLINE", "recovery": "RECOVERED"}
# Control characters (a line break in an account number, say) would end a mail header
# early or be refused by the mail library: a subject has none.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def job_link(base_url: str | None, job_id: UUID) -> str | None:
    """The job's page in the app (NOTIFY_APP_BASE_URL + /jobs/<id>)."""
    return f"{base_url.rstrip('/')}/jobs/{job_id}" if base_url else None


def subject(n: Notice) -> str:
    target = f"{n.job.target} (account {n.job.account_number})"
    if n.kind in _TITLES:
        line = f"[Sound Check] {_TITLES[n.kind]}: {target}"
    else:
        assert n.summary is not None
        result = "PASS" if verdict(n.summary, n.job.slot_count).passed else "FAIL"
        line = f"[Sound Check] {result}: monitoring of {target} complete"
    return _CONTROL.sub(" ", line)


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "—"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} ms"


def lines(n: Notice) -> list[tuple[str, str]]:
    """The facts of the message, label and value, in the order they are shown."""
    j = n.job
    facts = [("Target", j.target), ("Account", j.account_number),
             ("Requested by", j.requester_name),
             ("Cadence", f"every {j.cadence_seconds} s"),
             ("Duration", f"{j.duration_minutes} min"), ("Started", _when(j.started_at))]
    if n.kind == "offline":
        facts.insert(0, ("Alert", "the target missed 5 pings in a row"))
        facts.append(("Offline since", _when(n.triggered_at)))
    elif n.kind == "recovery":
        facts.insert(0, ("Alert", "the target answered 5 pings in a row again"))
        facts.append(("Recovered at", _when(n.triggered_at)))
    else:
        assert n.summary is not None
        s, v = n.summary, verdict(n.summary, j.slot_count)
        facts.append(("Completed", _when(j.completed_at)))
        facts += [
            ("Result", ("PASS" if v.passed else "FAIL")
             + f" (a pass needs packet loss ≤ {LOSS_LIMIT:.0%} and p95 RTT ≤ "
               f"{P95_LIMIT_MS:g} ms)"),
            ("Samples", f"{s.total}: {s.success} success, {s.missed} missed, "
                        f"{s.system_error} system error"),
            ("Coverage", f"{s.total} of {j.slot_count} slots ({100 * v.coverage:.1f} %)"),
            ("Packet loss", "—" if v.packet_loss is None else f"{100 * v.packet_loss:.2f} %"),
            ("RTT", f"average {_ms(s.avg_rtt_ms)}, max {_ms(s.max_rtt_ms)}, "
                    f"p95 {_ms(s.p95_rtt_ms)}"),
            ("Outages", f"{s.outages} (5 or more misses in a row); longest miss streak "
                        f"{s.longest_miss_streak}"),
        ]
        facts += [("Warning", w) for w in v.warnings]
    return facts


def text(n: Notice, base_url: str | None) -> str:
    width = max(len(label) for label, _ in lines(n))
    body = [subject(n).removeprefix("[Sound Check] "), ""]
    body += [f"{label + ':':<{width + 1}} {value}" for label, value in lines(n)]
    if link := job_link(base_url, n.job.id):
        body += ["", f"Job: {link}"]
    return "\n".join(body) + "\n"


def html_body(n: Notice, base_url: str | None) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th align=\"left\">{esc(label)}</th><td>{esc(value)}</td></tr>"
                   for label, value in lines(n))
    link = job_link(base_url, n.job.id)
    footer = f"<p><a href=\"{esc(link)}\">Open the job in Sound Check</a></p>" if link else ""
    return (f"<html><body><h2>{esc(subject(n).removeprefix('[Sound Check] '))}</h2>"
            f"<table cellpadding=\"4\">{rows}</table>{footer}</body></html>")


def webhook_payload(n: Notice, base_url: str | None) -> dict[str, Any]:
    j = n.job
    out: dict[str, Any] = {
        "notice_id": n.id, "kind": n.kind, "text": subject(n),
        "job": {"id": str(j.id), "target": j.target, "account_number": j.account_number,
                "requester_name": j.requester_name, "cadence_seconds": j.cadence_seconds,
                "duration_minutes": j.duration_minutes, "started_at": j.started_at.isoformat(),
                "completed_at": j.completed_at.isoformat() if j.completed_at else None,
                "url": job_link(base_url, j.id)},
    }
    if n.triggered_at is not None:
        out["triggered_at"] = n.triggered_at.isoformat()
    if n.summary is not None:
        v = verdict(n.summary, j.slot_count)
        out["summary"] = {**vars(n.summary), "packet_loss": v.packet_loss,
                          "result": "PASS" if v.passed else "FAIL", "slots": j.slot_count,
                          "coverage": v.coverage, "warning": v.warning,
                          "warnings": list(v.warnings)}
    return out
