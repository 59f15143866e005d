"""How the Kubernetes API server patches objects, for the API emulation (kmock merges every
dict patch as a plain JSON merge patch, which hides the defects a real server shows).

- `strategic_merge(current, patch)`: `application/strategic-merge-patch+json`, what the
  `kubernetes` client sends for a dict body. Lists with a merge key are merged item by
  item, so an entry the patch leaves out *stays*: `containers`, `initContainers`, `env`,
  `volumes`, `imagePullSecrets` by `name`, `volumeMounts` by `mountPath`, container
  `ports` by `containerPort`, Service `ports` by `port`, `conditions` by `type`. Other lists
  are replaced. `null` deletes a key; `$patch: delete` in a keyed item deletes the item;
  `$patch: replace` in a dict replaces it.
- `server_side_apply(current, applied, previous)`: `application/apply-patch+yaml` with a
  field manager. Fields the manager applied before and does not apply now are removed
  (its managed set is what it applied last time), then the new configuration is merged
  with the same list keys. One manager per object is modelled: conflicts between managers
  are not (the operator applies with `force`).
JSON merge patches (`application/merge-patch+json`) and JSON patches stay kmock's own.
"""

from __future__ import annotations

import copy
from typing import Any

_KEYED = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
          "imagePullSecrets": "name", "volumeMounts": "mountPath", "conditions": "type"}


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":
        dicts = [i for i in items if isinstance(i, dict)]
        return "containerPort" if any("containerPort" in i for i in dicts) else "port"
    return _KEYED.get(field)


def strategic_merge(current: Any, patch: Any, field: str = "") -> Any:
    if isinstance(patch, dict) and isinstance(current, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(current)
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = _strip(value)
        return out
    if isinstance(patch, list) and isinstance(current, list):
        key = _merge_key(field, current + patch)
        if key is None:
            return _strip(patch)
        items = copy.deepcopy(current)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                continue
            at = next((i for i, have in enumerate(items)
                       if isinstance(have, dict) and have.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if at is not None:
                    del items[at]
            elif at is None:
                items.append(_strip(item))
            else:
                items[at] = strategic_merge(items[at], item, field)
        return items
    return _strip(patch)


def _strip(value: Any) -> Any:
    """A value without patch directives."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _prune(current: Any, previous: Any, applied: Any, field: str = "") -> Any:
    """`current` without what `previous` set and `applied` no longer sets."""
    if isinstance(current, dict) and isinstance(previous, dict):
        applied = applied if isinstance(applied, dict) else {}
        out = {}
        for key, value in current.items():
            if key in previous and key not in applied:
                continue  # this manager's field, given up
            out[key] = _prune(value, previous.get(key), applied.get(key), key) \
                if key in previous else value
        return out
    if isinstance(current, list) and isinstance(previous, list):
        key = _merge_key(field, current + previous)
        if key is None:
            return current  # atomic lists: replaced by the merge that follows
        now = {i.get(key): i for i in (applied or []) if isinstance(i, dict)}
        before = {i.get(key): i for i in previous if isinstance(i, dict)}
        kept: list[Any] = []
        for item in current:
            k = item.get(key) if isinstance(item, dict) else None
            if k in before and k not in now:
                continue
            kept.append(_prune(item, before[k], now[k], field) if k in before else item)
        return kept
    return current


def server_side_apply(current: dict[str, Any], applied: dict[str, Any],
                      previous: dict[str, Any] | None) -> dict[str, Any]:
    base = _prune(current, previous, applied) if previous is not None else current
    merged: dict[str, Any] = strategic_merge(base, applied)
    return merged
