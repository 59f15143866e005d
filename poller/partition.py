"""Which replica owns which job (docs/architecture.md, "Ownership"), mirrored bit for bit by
the SQL functions `soundcheck_bucket`, `soundcheck_jump_hash`, `soundcheck_owned_buckets`,
`soundcheck_rendezvous` and `soundcheck_owned_buckets_live`.

Jobs hash to one of 1024 buckets; buckets map to replicas by jump consistent hash, so
growing N → N+1 replicas moves about 1/(N+1) of the buckets instead of N/(N+1). Written
by hand: it is six lines, and it must match the SQL version exactly.

With failover, a bucket whose primary replica (its jump hash) is not live — leaving, or
silent for longer than the failover timeout — goes to the live replica that wins the
rendezvous hash (highest random weight) of bucket and replica. So every bucket has exactly
one owner among the live replicas, and a change of the live set moves only the buckets of
the replicas that came or went.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

BUCKETS = 1024
_MASK64 = (1 << 64) - 1
_ORDINAL = re.compile(r"-(\d+)$")


def bucket(job_id: uuid.UUID | str) -> int:
    digest = hashlib.md5(str(job_id).lower().encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % BUCKETS


def jump_hash(key: int, buckets: int) -> int:
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def owned_buckets(replica_id: int, replica_counts: Iterable[int]) -> frozenset[int]:
    """Buckets `replica_id` owns under any of the active counts (overlap, never a gap)."""
    counts = list(replica_counts)
    return frozenset(
        b for b in range(BUCKETS) if any(jump_hash(b, n) == replica_id for n in counts)
    )


def owns(job_id: uuid.UUID | str, replica_id: int, replica_counts: Iterable[int]) -> bool:
    b = bucket(job_id)
    return any(jump_hash(b, n) == replica_id for n in replica_counts)


def rendezvous(bucket_: int, live: Iterable[int]) -> int | None:
    """The live replica that takes over a bucket whose primary is not live (None: none)."""
    best: tuple[int, int] | None = None
    for r in live:
        digest = hashlib.md5(f"{bucket_}/{r}".encode(), usedforsecurity=False).digest()
        weight = int.from_bytes(digest[:4], "big")
        if best is None or (weight, -r) > (best[0], -best[1]):
            best = (weight, r)
    return None if best is None else best[1]


def owner(bucket_: int, count: int, live: frozenset[int] | set[int]) -> int | None:
    """The one replica that pings a bucket under `count` replicas, `live` being up."""
    primary = jump_hash(bucket_, count)
    return primary if primary in live else rendezvous(bucket_, sorted(live))


def owned_buckets_live(replica_id: int, replica_counts: Iterable[int],
                       live: Iterable[int]) -> frozenset[int]:
    """What `replica_id` pings: under any of the counts, the buckets it owns with `live`
    and itself up (a replica always keeps its own primaries: a leaving one until others
    have taken them, a silent one once it is back). A replica outside the topology (past
    the largest count) owns nothing."""
    counts = list(replica_counts)
    up = frozenset(live) | ({replica_id} if replica_id < max(counts) else set())
    return frozenset(b for b in range(BUCKETS)
                     if any(owner(b, n, up) == replica_id for n in counts))


@dataclass(frozen=True)
class Heartbeat:
    """A replica's last sync as the fleet sees it (the row in `poller_heartbeats`)."""

    replica_id: int
    age_s: float  # since that sync
    leaving: bool = False
    started_s: float | None = None  # since its process started (None: long ago, unknown)


def live_replicas(size: int, beats: Iterable[Heartbeat], failover_s: float) -> frozenset[int]:
    """The replicas of a fleet of `size` that count as live: synced within the failover
    timeout and not leaving; and, while the fleet starts (every such replica's process
    started within the timeout), every other replica of the topology except those leaving
    now. A replica that does not come up within the timeout is then taken over, as one
    that went silent would be; once a replica has run longer than the timeout the grace is
    over for good, so a crash in a running fleet is taken over as before."""
    beats = list(beats)
    fresh = [b for b in beats if b.age_s <= failover_s and b.replica_id < size]
    live = {b.replica_id for b in fresh if not b.leaving}
    starting = bool(live) and all(b.started_s is not None and b.started_s <= failover_s
                                  for b in fresh if not b.leaving)
    if not starting:
        return frozenset(live)
    leaving = {b.replica_id for b in fresh if b.leaving}
    return frozenset(r for r in range(size) if r not in leaving)


def ordinal_from_hostname(hostname: str) -> int | None:
    """The StatefulSet pod ordinal at the end of a hostname: `poller-3` → 3."""
    m = _ORDINAL.search(hostname)
    return int(m.group(1)) if m else None
