"""Status conditions in the Kubernetes shape; a transition time moves only on a change."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(conditions: list[dict[str, Any]], kind: str, status: bool, reason: str,
                  message: str) -> list[dict[str, Any]]:
    """A copy of `conditions` with `kind` set; others kept as they were."""
    value = "True" if status else "False"
    out = []
    found = False
    for cond in conditions:
        if cond.get("type") != kind:
            out.append(dict(cond))
            continue
        found = True
        same = cond.get("status") == value
        out.append({"type": kind, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": cond.get("lastTransitionTime") if same
                    else now_iso()})
    if not found:
        out.append({"type": kind, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": now_iso()})
    return out


def is_true(conditions: list[dict[str, Any]], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)
