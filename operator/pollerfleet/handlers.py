"""kopf handlers: translate between Kubernetes and the plain functions of this package.

- create / resume / spec update → render the owned objects and apply them;
- a timer every POLLERFLEET_TICK_SECONDS → at the fleet's syncIntervalSeconds, read the
  fleet's state, decide the size (sizing.decide), take the next handover step
  (handover.next_step: publish a topology, scale the StatefulSet), report status.
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

from . import kube, load, metrics, render
from .conditions import is_true, now_iso, set_condition
from .handover import next_step
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
    metrics.serve()


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
    # Keep the size the timer chose, even outside a new min/max: only the timer resizes,
    # through the handover (lowering replicas here would drop pods before their buckets
    # were handed over). A new fleet starts at minReplicas.
    replicas = sts["spec"]["replicas"] if sts else fleet.min_replicas
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
        await _apply_all(body, name, namespace, fleet, 0)
        return
    pods = int(sts["spec"].get("replicas", 0))
    ready = int((sts.get("status") or {}).get("readyReplicas", 0))
    key = render.fleet_key(namespace, name)
    conds = set_condition(status.get("conditions") or [], "Ready", True, "Reconciled",
                          "owned objects match the spec")
    new: dict[str, Any] = {}
    desired = pods
    try:
        state = await load.fleet_state(key)
    except StoreError as exc:
        # Never resize (nor hand over) on a failed read: keep the size, say why.
        metrics.load_errors.labels(key).inc()
        was = conds
        conds = set_condition(conds, "Degraded", True, "LoadUnavailable", str(exc))
        if was != conds and not is_true(was, "Degraded"):
            kopf.warn(body, reason="LoadUnavailable", message=f"keeping {pods} replicas: {exc}")
    else:
        decision = decide(state.running_jobs, pods, fleet, tuple(memo.get("history", ())), now)
        memo["history"] = decision.history
        desired = decision.desired
        step = next_step(state.counts, state.epoch, pods, ready, desired, state.seen)
        topology = state.counts
        if step.publish is not None:
            await load.publish_topology(key, step.publish)
            topology = step.publish
        if step.scale_to is not None and step.scale_to != pods:
            await asyncio.to_thread(kube.scale_statefulset, namespace, name, step.scale_to)
            kopf.info(body, reason="Scaled", message=(
                f"{pods} → {step.scale_to} replicas for {state.running_jobs} running jobs"))
            metrics.scale_events.labels(key).inc()
            new["lastScaleTime"] = now_iso()
        metrics.running_jobs.labels(key).set(state.running_jobs)
        metrics.stale_jobs.labels(key).set(state.stale_jobs)
        metrics.replicas_reporting.labels(key).set(state.reporting)
        metrics.desired_replicas.labels(key).set(desired)
        conds = _stale_condition(body, conds, state.stale_jobs, memo, now,
                                 window=float(fleet.stale_window_s))
        new.update({
            "runningJobs": state.running_jobs,
            "staleJobs": state.stale_jobs,
            "replicasReporting": state.reporting,
            "topology": "+".join(map(str, topology or ())),
        })
        if step.waiting:
            new["handover"] = step.waiting
        elif status.get("handover"):
            new["handover"] = None
    conds = set_condition(conds, "Scaling", ready != desired or pods != desired,
                          "Scaling" if ready != desired else "Stable",
                          f"{ready}/{desired} replicas ready")
    new.update({
        "desiredReplicas": desired,
        "currentReplicas": int((sts.get("status") or {}).get("replicas", pods)),
        "readyReplicas": ready,
        "conditions": conds,
        "observedGeneration": body.metadata.get("generation"),
    })
    _write_status(patch, status, new)


def _stale_condition(body: kopf.Body, conds: list[dict[str, Any]], stale: int,
                     memo: kopf.Memo, now: float, window: float) -> list[dict[str, Any]]:
    """Degraded while jobs have gone without samples for a sustained window."""
    if stale == 0:
        memo.pop("stale_since", None)
        return set_condition(conds, "Degraded", False, "Healthy", "every running job is sampled")
    since = memo.setdefault("stale_since", now)
    if now - since < window:
        # The message stays the same from sync to sync: an unchanged status is not written.
        return set_condition(conds, "Degraded", False, "Healthy",
                             f"{stale} jobs without a recent sample, under watch")
    message = f"{stale} running jobs have had no sample for over twice their cadence"
    if not is_true(conds, "Degraded"):
        kopf.warn(body, reason="StaleJobs", message=message)
    return set_condition(conds, "Degraded", True, "StaleJobs", message)
