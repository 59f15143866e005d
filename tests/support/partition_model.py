"""The failover rules of the fleet as a plain-Python reference model: the tests check the SQL
functions (`soundcheck_rendezvous`, `soundcheck_owned_buckets_live`, the live set of
`poller_fleet_sync`) against it, and its properties with hypothesis. The poller itself
never runs it: the database decides ownership (docs/architecture.md, "Failover").

With failover, a bucket whose primary replica (its jump hash) is not live — leaving, or
silent for longer than the failover timeout — goes to the live replica that wins the
rendezvous hash (highest random weight) of bucket and replica. So every bucket has exactly
one owner among the live replicas, and a change of the live set moves only the buckets of
the replicas that came or went.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from poller.partition import BUCKETS, jump_hash


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
