"""Which replica owns which job (docs/architecture.md, "Ownership"), mirrored bit for bit by
the SQL functions `soundcheck_bucket`, `soundcheck_jump_hash` and `soundcheck_owned_buckets`.
The failover rules (`soundcheck_rendezvous`, `soundcheck_owned_buckets_live`, the live set)
run in the database only; their reference model, which the tests check the SQL against,
is tests/support/partition_model.py.

Jobs hash to one of 1024 buckets; buckets map to replicas by jump consistent hash, so
growing N → N+1 replicas moves about 1/(N+1) of the buckets instead of N/(N+1). Written
by hand: it is six lines, and it must match the SQL version exactly.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable

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


def ordinal_from_hostname(hostname: str) -> int | None:
    """The StatefulSet pod ordinal at the end of a hostname: `poller-3` → 3."""
    m = _ORDINAL.search(hostname)
    return int(m.group(1)) if m else None
