"""Partitioning: the Python and SQL implementations agree with reference vectors."""

from __future__ import annotations

import hashlib
import random
import uuid

import asyncpg
import pytest

from poller.partition import BUCKETS, bucket, jump_hash, ordinal_from_hostname, owned_buckets

# (key, buckets, expected) from the reference C++ of Lamping & Veach 2014, compiled with gcc:
# int32_t JumpConsistentHash(uint64_t key, int32_t num_buckets).
JUMP_VECTORS = [
    (0, 1, 0), (0, 5, 0), (0, 1000, 0), (1, 2, 0), (1, 10, 6), (1, 65536, 21134),
    (2, 3, 0), (2, 100, 62), (3, 1, 0), (3, 5, 3), (3, 1000, 961), (7, 2, 0), (7, 10, 0),
    (7, 65536, 20139), (100, 3, 1), (100, 100, 69), (1023, 1, 0), (1023, 5, 4),
    (1023, 1000, 497), (123456789, 2, 0), (123456789, 10, 7), (123456789, 65536, 42483),
    (18446744073709551615, 3, 2), (18446744073709551615, 100, 92),
    (9223372036854775808, 1, 0), (9223372036854775808, 5, 4), (9223372036854775808, 1000, 453),
]

# (uuid, bucket) computed independently with coreutils:
#   printf %s <uuid> | md5sum | cut -c1-8   → hex, then mod 1024.
BUCKET_VECTORS = [
    ("00000000-0000-0000-0000-000000000000", 74),  # 9f89c84a
    ("6f1c2a9e-8d3b-4c5f-9e7a-1b2c3d4e5f60", 650),  # b272928a
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 109),  # b537846d
]


def _signed64(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


@pytest.mark.parametrize(("key", "n", "expected"), JUMP_VECTORS)
def test_jump_hash_python_matches_reference(key: int, n: int, expected: int) -> None:
    assert jump_hash(key, n) == expected


async def test_jump_hash_sql_matches_reference(conn: asyncpg.Connection) -> None:
    got = await conn.fetch(
        "select soundcheck_jump_hash(k, n) as b from unnest($1::bigint[], $2::int[]) as u(k, n)",
        [_signed64(k) for k, _, _ in JUMP_VECTORS], [n for _, n, _ in JUMP_VECTORS])
    assert [r["b"] for r in got] == [e for _, _, e in JUMP_VECTORS]


def test_jump_hash_rejects_zero_buckets() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        jump_hash(1, 0)


@pytest.mark.parametrize(("job", "expected"), BUCKET_VECTORS)
def test_bucket_vectors_python(job: str, expected: int) -> None:
    assert bucket(job) == expected
    assert bucket(job.upper()) == expected


async def test_bucket_vectors_sql(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("select soundcheck_bucket(u::uuid) as b from unnest($1::text[]) u",
                            [j for j, _ in BUCKET_VECTORS])
    assert [r["b"] for r in rows] == [e for _, e in BUCKET_VECTORS]


def test_bucket_matches_an_independent_md5() -> None:
    for _ in range(200):
        job = uuid.uuid4()
        digest = hashlib.md5(str(job).encode()).hexdigest()
        assert bucket(job) == int(digest[:8], 16) % BUCKETS
    # Case does not matter: the SQL side hashes lower(uuid::text).
    text = "6F1C2A9E-8D3B-4C5F-9E7A-1B2C3D4E5F60"
    assert bucket(text) == bucket(text.lower())


async def test_bucket_sql_matches_python(conn: asyncpg.Connection) -> None:
    ids = [uuid.uuid4() for _ in range(2000)]
    rows = await conn.fetch(
        "select id, soundcheck_bucket(id) as b from unnest($1::uuid[]) as id", ids)
    assert {r["id"]: r["b"] for r in rows} == {i: bucket(i) for i in ids}


@pytest.mark.parametrize("counts", [[1], [2], [3], [7], [3, 4], [10, 9], [1, 2, 3]])
async def test_owned_buckets_sql_matches_python(conn: asyncpg.Connection,
                                                counts: list[int]) -> None:
    for replica in range(max(counts)):
        sql = await conn.fetchval("select soundcheck_owned_buckets($1, $2)", replica, counts)
        assert frozenset(sql) == owned_buckets(replica, counts)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_owners_partition_the_buckets_exactly(n: int) -> None:
    owned = [owned_buckets(r, [n]) for r in range(n)]
    assert sum(len(o) for o in owned) == BUCKETS  # disjoint …
    assert frozenset().union(*owned) == frozenset(range(BUCKETS))  # … and complete


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9])
def test_growing_moves_about_one_in_n_plus_one(n: int) -> None:
    moved = sum(jump_hash(b, n) != jump_hash(b, n + 1) for b in range(BUCKETS))
    expected = BUCKETS / (n + 1)
    # Binomial(1024, 1/(n+1)) stays within 4 standard deviations of its mean.
    sd = (BUCKETS * (1 / (n + 1)) * (1 - 1 / (n + 1))) ** 0.5
    assert abs(moved - expected) <= 4 * sd, (moved, expected)
    # Only to the new replica, never between old ones.
    assert all(jump_hash(b, n + 1) in (jump_hash(b, n), n) for b in range(BUCKETS))


def test_overlap_owns_both_shares() -> None:
    both = owned_buckets(1, [3, 4])
    assert both == owned_buckets(1, [3]) | owned_buckets(1, [4])


@pytest.mark.parametrize(("host", "ordinal"), [
    ("soundcheck-poller-0", 0), ("poller-12", 12), ("poller", None), ("", None),
    ("poller-3a", None),
])
def test_ordinal_from_hostname(host: str, ordinal: int | None) -> None:
    assert ordinal_from_hostname(host) == ordinal


# Failover: the ownership rule with a live set (property tests).
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.support.partition_model import owned_buckets_live, owner, rendezvous  # noqa: E402

counts_st = st.integers(min_value=1, max_value=12)
live_st = st.frozensets(st.integers(min_value=0, max_value=11), min_size=1)


@settings(max_examples=60, deadline=None)
@given(counts_st, live_st)
def test_every_bucket_has_exactly_one_live_owner(n: int, live: frozenset[int]) -> None:
    live = frozenset(r for r in live if r < n) or frozenset({0})
    claims = {r: owned_buckets_live(r, [n], live) for r in live}
    for b in range(BUCKETS):
        holders = [r for r, owned in claims.items() if b in owned]
        assert holders == [owner(b, n, live)], (b, holders)


@settings(max_examples=60, deadline=None)
@given(counts_st, live_st, st.integers(min_value=0, max_value=11))
def test_a_replica_going_or_coming_moves_only_what_it_owned(
        n: int, live: frozenset[int], changed: int) -> None:
    live = frozenset(r for r in live if r < n) | {n - 1}
    changed = changed % n
    before = live | {changed}
    after = (live - {changed}) or {n - 1 if changed != n - 1 else 0}
    if changed == (n - 1) and not (live - {changed}):
        return  # no replica would be left: nothing to compare
    for b in range(BUCKETS):
        was, now = owner(b, n, before), owner(b, n, frozenset(after))
        if was != now:
            assert changed in (was, now), (b, was, now)


def test_a_replica_keeps_its_own_primaries_even_when_not_live() -> None:
    # A leaving replica pings its buckets until the others have taken them.
    mine = owned_buckets_live(2, [4], live={0, 1, 3})
    assert mine == owned_buckets(2, [4])
    assert rendezvous(5, []) is None


async def test_sql_live_ownership_matches_python(conn: asyncpg.Connection) -> None:
    for replica, counts, live in ((0, [3], [1, 2]), (1, [3], [1, 2]), (2, [4, 5], [0, 4]),
                                  (3, [5], [0, 1, 2, 3, 4]), (0, [1], []), (4, [3], [0])):
        for _ in range(2):  # computed, then kept (poller_owned_buckets): the same answer
            got = await conn.fetchval("select soundcheck_owned_buckets_live($1, $2, $3)",
                                      replica, counts, live)
            assert frozenset(got) == owned_buckets_live(replica, counts, live), (replica, live)
    # One kept answer per key; a live set in another order or repeated is the same key.
    assert await conn.fetchval("select count(*) from poller_owned_buckets") == 6
    assert frozenset(await conn.fetchval(
        "select soundcheck_owned_buckets_live(2, '{4,5}', '{4,0,4}')")) == \
        owned_buckets_live(2, [4, 5], [0, 4])
    assert await conn.fetchval("select count(*) from poller_owned_buckets") == 6
    for b in range(0, BUCKETS, 37):
        assert await conn.fetchval("select soundcheck_rendezvous($1, $2)", b,
                                   [0, 3, 5, 9]) == rendezvous(b, [0, 3, 5, 9])


# Liveness: while a fleet starts, the replicas not seen yet count as live.
from tests.support.partition_model import Heartbeat, live_replicas  # noqa: E402

FAILOVER = 15.0
beat_st = st.builds(
    Heartbeat, st.integers(min_value=0, max_value=11),
    st.sampled_from([0.0, 3.0, 14.0, 15.0, 16.0, 600.0]), st.booleans(),
    st.one_of(st.none(), st.sampled_from([0.5, 10.0, 15.0, 16.0, 3600.0])))
beats_st = st.lists(beat_st, max_size=12, unique_by=lambda b: b.replica_id)


def _plain(size: int, beats: list[Heartbeat]) -> frozenset[int]:
    """The rule without the start's grace: synced lately, not leaving, in the topology."""
    return frozenset(b.replica_id for b in beats
                     if b.age_s <= FAILOVER and not b.leaving and b.replica_id < size)


@settings(max_examples=200, deadline=None)
@given(counts_st, beats_st)
def test_liveness_adds_only_unseen_replicas_and_only_while_the_fleet_starts(
        n: int, beats: list[Heartbeat]) -> None:
    live = live_replicas(n, beats, FAILOVER)
    plain = _plain(n, beats)
    assert plain <= live <= frozenset(range(n))
    # Never live: a replica leaving now.
    assert not live & {b.replica_id for b in beats if b.leaving and b.age_s <= FAILOVER}
    running = [b for b in beats if b.replica_id in plain]
    if any(b.started_s is None or b.started_s > FAILOVER for b in running) or not plain:
        assert live == plain  # a running fleet, or nobody up: as before


@pytest.mark.slow  # seconds: out of the fast lane
@settings(max_examples=100, deadline=None)
@given(counts_st, st.data())
def test_replicas_starting_together_each_ping_only_their_own_share(
        n: int, data: st.DataObject) -> None:
    # Any subset of the fleet up so far, each started within the timeout.
    up = data.draw(st.frozensets(st.integers(min_value=0, max_value=n - 1), min_size=1))
    beats = [Heartbeat(r, 0.0, started_s=data.draw(st.sampled_from([0.0, 5.0, 15.0])))
             for r in up]
    live = live_replicas(n, beats, FAILOVER)
    assert live == frozenset(range(n))
    for r in up:
        assert owned_buckets_live(r, [n], live) == owned_buckets(r, [n])
    # One timeout after the first start, the ones still missing are taken over.
    later = [Heartbeat(b.replica_id, 0.0, started_s=FAILOVER + 1) for b in beats]
    assert live_replicas(n, later, FAILOVER) == up


async def test_sql_liveness_matches_python(conn: asyncpg.Connection) -> None:
    rng = random.Random(12)
    fleet = "soundcheck/live"
    await conn.fetchval("select poller_publish_topology($1, '{6}')", fleet)
    await conn.execute("select poller_set_failover($1, 15)", fleet)
    for case in range(40):
        beats = [Heartbeat(r, rng.choice([0.0, 10.0, 20.0, 600.0]), rng.random() < 0.2,
                           rng.choice([None, 1.0, 10.0, 20.0, 3600.0]))
                 for r in rng.sample(range(8), rng.randint(0, 8))]
        async with conn.transaction():
            await conn.execute("delete from poller_heartbeats where fleet = $1", fleet)
            for b in beats:  # rows of running processes (applied_at set): as written
                await conn.execute(
                    "insert into poller_heartbeats (fleet, replica_id, counts, epoch, "
                    "owned_jobs, version, seen_at, leaving_since, applied_at, started_at) "
                    "values ($1, $2, '{6}', 1, 0, 'v', now() - make_interval(secs => $3), "
                    "case when $4 then now() end, now(), now() - make_interval(secs => $5))",
                    fleet, b.replica_id, b.age_s, b.leaving, b.started_s)
            got = await conn.fetchval("select poller_live_replicas($1)", fleet)
        assert frozenset(got) == live_replicas(6, beats, FAILOVER), (case, beats)
