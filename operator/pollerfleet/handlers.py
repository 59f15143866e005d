"""kopf handlers: translate between Kubernetes and the plain functions of this package.

- create / resume / spec update → render the owned objects and apply them;
- a timer every POLLERFLEET_TICK_SECONDS → at the fleet's syncIntervalSeconds, read the
  load, decide the size (sizing.decide), scale the StatefulSet, report status.
An invalid spec becomes a condition and an event, never an exception (which kopf would
retry forever). Status is patched only with what changed, so a quiet fleet costs reads
only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import kopf

from poller.store import StoreError

from . import kube, load, render
from .conditions import is_true, now_iso, set_condition
from .sizing import decide
from .spec import FleetSpec, SpecError, parse

GROUP, VERSION, PLURAL = "soundcheck.io", "v1alpha1", "pollerfleets"
TICK_S = float(os.environ.get("POLLERFLEET_TICK_SECONDS", "5"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.INFO
    # Keep kopf's bookkeeping in annotations of our own prefix, not in .status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="soundcheck.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="soundcheck.io", key="last-handled-configuration")


@kopf.on.cleanup()
async def close_store(**_: Any) -> None:
    await load.close()


def _write_status(patch: kopf.Patch, status: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if status.get(key) != value:
            patch.status[key] = value


async def _validated(body: kopf.Body, spec: dict[str, Any], namespace: str,
                     status: dict[str, Any], patch: kopf.Patch) -> FleetSpec | None:
    """The parsed spec, or None after reporting why it cannot be acted on."""
    try:
        fleet = parse(spec)
        keys = await asyncio.to_thread(kube.secret_keys, namespace, fleet.database.secret_name)
        if keys is None:
            raise SpecError(f"spec.database.secretName: Secret {fleet.database.secret_name!r} "
                            f"not found in namespace {namespace!r}")
        missing = sorted(set(fleet.database.keys) - keys)
        if missing:
            raise SpecError(f"spec.database: Secret {fleet.database.secret_name!r} has no "
                            f"key {', '.join(missing)}")
        return fleet
    except SpecError as exc:
        old = status.get("conditions") or []
        conds = set_condition(old, "Ready", False, "InvalidSpec", str(exc))
        if conds != old:  # an event per new problem, not per retry
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        _write_status(patch, status, {
            "conditions": conds,
            "observedGeneration": body.metadata.get("generation"),
        })
        return None


async def _apply_all(body: kopf.Body, name: str, namespace: str, fleet: FleetSpec,
                     replicas: int) -> None:
    for obj in (render.statefulset(name, namespace, fleet, replicas),
                render.service(name, namespace), render.pdb(name, namespace)):
        kopf.adopt(obj, owner=body)  # owner reference: deleting the fleet deletes these
        await asyncio.to_thread(kube.apply, obj)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, spec: dict[str, Any], name: str, namespace: str,
                    status: dict[str, Any], patch: kopf.Patch, **_: Any) -> None:
    fleet = await _validated(body, spec, namespace, status, patch)
    if fleet is None:
        return
    sts = await asyncio.to_thread(kube.read_statefulset, namespace, name)
    # Keep the size the timer chose; a new fleet starts at minReplicas.
    replicas = sts["spec"]["replicas"] if sts else fleet.min_replicas
    replicas = max(fleet.min_replicas, min(fleet.max_replicas, replicas))
    await _apply_all(body, name, namespace, fleet, replicas)
    conds = set_condition(status.get("conditions") or [], "Ready", True, "Reconciled",
                          "owned objects match the spec")
    _write_status(patch, status, {
        "conditions": conds,
        "desiredReplicas": replicas,
        "observedGeneration": body.metadata.get("generation"),
    })


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_S)
async def sync(body: kopf.Body, spec: dict[str, Any], name: str, namespace: str,
               status: dict[str, Any], patch: kopf.Patch, memo: kopf.Memo,
               **_: Any) -> None:
    now = time.time()
    if now - memo.get("last_sync", 0.0) < float(spec.get("syncIntervalSeconds", 30)):
        return
    memo["last_sync"] = now
    fleet = await _validated(body, spec, namespace, status, patch)
    if fleet is None:
        return
    sts = await asyncio.to_thread(kube.read_statefulset, namespace, name)
    if sts is None:  # deleted behind our back, or a spec that was invalid until now
        await _apply_all(body, name, namespace, fleet, fleet.min_replicas)
        return
    current = int(sts["spec"].get("replicas", 0))
    conds = set_condition(status.get("conditions") or [], "Ready", True, "Reconciled",
                          "owned objects match the spec")
    new: dict[str, Any] = {}
    try:
        fleet_load = await load.fleet_load()
    except StoreError as exc:
        # Never resize on a failed read: keep the size, say why.
        desired = current
        was = conds
        conds = set_condition(conds, "Degraded", True, "LoadUnavailable", str(exc))
        if was != conds and not is_true(was, "Degraded"):
            kopf.warn(body, reason="LoadUnavailable", message=f"keeping {current} replicas: {exc}")
    else:
        decision = decide(fleet_load.running_jobs, current, fleet,
                          tuple(memo.get("history", ())), now)
        memo["history"] = decision.history
        desired = decision.desired
        conds = set_condition(conds, "Degraded", False, "LoadRead",
                              f"{fleet_load.running_jobs} running jobs")
        new["runningJobs"] = fleet_load.running_jobs
        if desired != current:
            await asyncio.to_thread(kube.scale_statefulset, namespace, name, desired)
            kopf.info(body, reason="Scaled", message=(
                f"{current} → {desired} replicas for {fleet_load.running_jobs} running jobs"))
            new["lastScaleTime"] = now_iso()
    ready = int((sts.get("status") or {}).get("readyReplicas", 0))
    conds = set_condition(conds, "Scaling", ready != desired, "Scaling" if ready != desired
                          else "Stable", f"{ready}/{desired} replicas ready")
    new.update({
        "desiredReplicas": desired,
        "currentReplicas": int((sts.get("status") or {}).get("replicas", current)),
        "readyReplicas": ready,
        "conditions": conds,
        "observedGeneration": body.metadata.get("generation"),
    })
    _write_status(patch, status, new)

