"""kopf handlers: translate between Kubernetes and the plain functions of this package.

One writer per fleet: a daemon (`fleet_loop`) wakes every `syncIntervalSeconds` (on the
monotonic clock, so a step of the wall clock neither stops nor rushes it) and is the only
code that writes the fleet's owned objects, their size included:

    observe  the spec, the Secret's keys, the StatefulSet, the fleet state (SQL API)
    decide   sizing.decide, handover.next_step, render.* (pure functions)
    act      publish a topology, apply what changed (server-side apply), patch status

A spec change only wakes the daemon, so a create or an edit never races a resize: the
first StatefulSet is written once, already at its decided size. An invalid spec becomes a
condition and an event, never an exception (which kopf would retry forever). Owned
objects are applied only when their rendered digest changes, and status only with what
changed, so a quiet fleet costs reads only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from poller.store import FleetState, StoreError

from . import kube, load, metrics, render
from .conditions import is_true, now_iso, set_condition
from .crd import GROUP, PLURAL, VERSION
from .handover import Step, next_step
from .sizing import decide
from .spec import FleetSpec, SpecError, parse

_ERROR_RETRY_S = 5.0  # after an unexpected error (the API server refused a write, …)

log = logging.getLogger("pollerfleet")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.INFO
    # Keep kopf's bookkeeping in annotations of our own prefix, not in .status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    metrics.serve()


@kopf.on.cleanup()
async def close_store(**_: Any) -> None:
    await load.close()


def _wake(memo: kopf.Memo) -> asyncio.Event:
    if "wake" not in memo:
        memo["wake"] = asyncio.Event()
    wake: asyncio.Event = memo["wake"]
    return wake


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def spec_changed(memo: kopf.Memo, **_: Any) -> None:
    """Act on the new spec now rather than at the next interval (the daemon acts). Async:
    kopf runs plain functions in a thread, and an asyncio.Event is not thread-safe."""
    _wake(memo).set()


# kopf's DaemonFn protocol spells out every keyword it passes; a handler that takes the
# ones it uses and **_ for the rest is how kopf's own docs write them.
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)  # type: ignore[arg-type]
async def fleet_loop(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo,
                     **_: Any) -> None:
    wake = _wake(memo)
    while True:
        wake.clear()
        began = time.monotonic()
        interval = _interval(body.get("spec") or {})
        try:
            await sync_fleet(body, name, namespace, memo)
        except Exception:
            log.exception("fleet %s/%s: sync failed, retrying", namespace, name)
            interval = min(interval, _ERROR_RETRY_S)
        try:
            async with asyncio.timeout(max(0.0, began + interval - time.monotonic())):
                await wake.wait()
        except TimeoutError:
            pass


def _interval(spec: dict[str, Any]) -> float:
    value = spec.get("syncIntervalSeconds", 30)
    return float(value) if isinstance(value, int) and value >= 1 else 30.0


async def sync_fleet(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo) -> None:
    """One observe → decide → act round for a fleet."""
    status: dict[str, Any] = memo.setdefault("status", dict(body.get("status") or {}))
    conds = list(status.get("conditions") or [])
    new: dict[str, Any] = {"observedGeneration": body.metadata.get("generation")}
    key = render.fleet_key(namespace, name)
    # Observe.
    try:
        fleet = await _checked_spec(body.get("spec") or {}, namespace)
    except SpecError as exc:
        invalid = set_condition(conds, "Ready", False, "InvalidSpec", str(exc))
        if invalid != conds:  # an event per new problem, not per sync
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        metrics.condition.labels(key, "Ready").set(0)
        await _write_status(namespace, name, status, {**new, "conditions": invalid})
        return
    sts = await asyncio.to_thread(kube.read_statefulset, namespace, name)
    # Decide from the size this operator applied; a different live size was set by someone
    # else (`kubectl scale`) and is put back below.
    pods = render.applied_replicas(sts)
    live = int(sts["spec"].get("replicas", 0)) if sts else 0
    ready = int(((sts or {}).get("status") or {}).get("readyReplicas", 0))
    now = time.monotonic()
    conds = set_condition(conds, "Ready", True, "Reconciled", "owned objects match the spec")
    try:
        loaded = await load.fleet_state(key)
    except StoreError as exc:
        # Never resize (nor hand over) on a failed read: keep the size, say why.
        metrics.load_errors.labels(key).inc()
        was = conds
        conds = set_condition(conds, "Degraded", True, "LoadUnavailable", str(exc))
        if was != conds and not is_true(was, "Degraded"):
            kopf.warn(body, reason="LoadUnavailable", message=f"keeping {pods} replicas: {exc}")
        step, desired, topology, state = Step(), pods, None, None
    else:
        state = loaded
        # Decide.
        decision = decide(loaded.running_jobs, pods, fleet, tuple(memo.get("history", ())), now)
        memo["history"] = decision.history
        desired = decision.desired
        step = next_step(loaded.counts, loaded.epoch, pods, ready, desired, loaded.seen)
        topology = step.publish or loaded.counts
        conds = _stale_condition(body, conds, loaded.stale_jobs, memo, now,
                                 window=float(fleet.stale_window_s))
        conds = _silent_condition(body, conds, loaded, memo)
        new["silentReplicas"] = ",".join(map(str, sorted(loaded.silent))) or None
        metrics.replicas_silent.labels(key).set(len(loaded.silent))
        metrics.syncs.labels(key).inc()
        for gauge, value in ((metrics.running_jobs, loaded.running_jobs),
                             (metrics.stale_jobs, loaded.stale_jobs),
                             (metrics.replicas_reporting, loaded.reporting),
                             (metrics.desired_replicas, desired)):
            gauge.labels(key).set(value)
        if step.waiting:
            waited = now - memo.setdefault("waiting_since", now)
        else:
            waited = 0.0
            memo.pop("waiting_since", None)
        metrics.handover_waiting.labels(key).set(waited)
        new.update(await _notices(key))
        new.update({"runningJobs": loaded.running_jobs, "staleJobs": loaded.stale_jobs,
                    "replicasReporting": loaded.reporting,
                    "topology": "+".join(map(str, topology or ())),
                    "handover": step.waiting or None})
    replicas = pods if step.scale_to is None else step.scale_to
    # Act: the topology first (pods must find it), then the objects.
    if step.publish is not None:
        await load.publish_topology(key, step.publish)
    if state is not None and topology and state.failover_s != fleet.failover_s:
        await load.set_failover(key, fleet.failover_s)
    if live != pods:
        kopf.warn(body, reason="ReplicasOverridden", message=f"StatefulSet scaled to {live} "
                  f"outside the operator: back to {replicas}")
    await _apply_owned(body, name, namespace, fleet, replicas, sts, memo,
                       force=live != pods)
    if sts is not None and replicas != pods:
        kopf.info(body, reason="Scaled", message=f"{pods} → {replicas} replicas for "
                  f"{new.get('runningJobs', '?')} running jobs")
        metrics.scale_events.labels(key).inc()
        new["lastScaleTime"] = now_iso()
    conds = set_condition(conds, "Scaling", ready != desired or pods != desired,
                          "Scaling" if ready != desired else "Stable",
                          f"{ready}/{desired} replicas ready")
    metrics.ready_replicas.labels(key).set(ready)
    for cond in conds:
        metrics.condition.labels(key, cond["type"]).set(cond["status"] == "True")
    new.update({"desiredReplicas": desired, "readyReplicas": ready, "conditions": conds,
                "currentReplicas": int(((sts or {}).get("status") or {}).get("replicas",
                                                                            pods))})
    await _write_status(namespace, name, status, new)


async def _notices(key: str) -> dict[str, Any]:
    """The outbox, for the status and metrics; a failed read leaves them as they were (the
    fleet state was read: the database is there, this is no reason to degrade)."""
    try:
        outbox = await load.outbox_state()
    except StoreError as exc:
        log.warning("fleet %s: cannot read the notice outbox: %s", key, exc)
        return {}
    metrics.notices_pending.labels(key).set(outbox.pending)
    metrics.notice_oldest_pending.labels(key).set(outbox.oldest_pending_s)
    metrics.notices_failed.labels(key).set(outbox.failed_24h)
    return {"pendingNotices": outbox.pending, "failedNotices": outbox.failed_24h}


async def _checked_spec(spec: dict[str, Any], namespace: str) -> FleetSpec:
    """The parsed spec, once the Secrets it names are known to hold its keys (a pod whose
    Secret or key is missing would never start)."""
    fleet = parse(spec)
    for path, secret, wanted in fleet.secret_refs():
        keys = await asyncio.to_thread(kube.secret_keys, namespace, secret)
        if keys is None:
            raise SpecError(f"{path}.secretName: Secret {secret!r} not found in namespace "
                            f"{namespace!r}")
        missing = sorted(set(wanted) - keys)
        if missing:
            raise SpecError(f"{path}: Secret {secret!r} has no key {', '.join(missing)}")
    return fleet


async def _apply_owned(body: kopf.Body, name: str, namespace: str, fleet: FleetSpec,
                       replicas: int, sts: dict[str, Any] | None, memo: kopf.Memo,
                       force: bool) -> None:
    """Apply each owned object whose rendering changed since it was last applied: the
    StatefulSet compared with its observed annotation (or always, with `force`: its size was
    changed behind the operator's back), the others with memory (applied once per operator
    start, then on change)."""
    applied: dict[str, str | None] = memo.setdefault("applied", {})
    applied["StatefulSet"] = None if force else render.applied_hash(sts)
    for obj in (render.statefulset(name, namespace, fleet, replicas),
                render.service(name, namespace), render.pdb(name, namespace)):
        kopf.adopt(obj, owner=body)  # owner reference: deleting the fleet deletes these
        obj = render.stamped(obj)
        digest = render.applied_hash(obj)
        if applied.get(obj["kind"]) != digest:
            await asyncio.to_thread(kube.apply, obj)
            applied[obj["kind"]] = digest


async def _write_status(namespace: str, name: str, status: dict[str, Any],
                        new: dict[str, Any]) -> None:
    """Patch only what changed; `status` is what this operator last wrote."""
    changes = {k: v for k, v in new.items() if status.get(k) != v}
    if changes:
        await asyncio.to_thread(kube.patch_fleet_status, namespace, name, changes)
        status.update(changes)


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


def _silent_condition(body: kopf.Body, conds: list[dict[str, Any]], state: FleetState,
                      memo: kopf.Memo) -> list[dict[str, Any]]:
    """`Failover` while replicas are silent past the failover timeout; one event for each
    replica that goes silent (the live ones ping its share meanwhile)."""
    before: set[int] = memo.get("silent", set())
    for replica in sorted(set(state.silent) - before):
        kopf.warn(body, reason="ReplicaSilent", message=(
            f"replica {replica} has not synced for {state.silent[replica]:.0f}s (failover "
            f"after {state.failover_s}s): the live replicas ping its share until it is back"))
    memo["silent"] = set(state.silent)
    if not state.silent:
        return set_condition(conds, "Failover", False, "AllReporting",
                             "every replica syncs within the failover timeout")
    return set_condition(conds, "Failover", True, "ReplicasSilent",
                         f"replicas {','.join(map(str, sorted(state.silent)))} silent; their "
                         "share is pinged by the live replicas")
