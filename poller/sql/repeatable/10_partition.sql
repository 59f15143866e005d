-- Partitioning: the bucket of a job, and which replica pings it (docs/architecture.md,
-- "How it works"). tests/support/partition_model.py is the same rules in Python; the
-- property tests in tests/test_partition.py hold these functions to it.
insert into soundcheck_repeatables (name, revision) values ('10_partition', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';

-- bucket = first 4 bytes of md5(lowercase uuid text), big-endian, mod 1024.
create or replace function soundcheck_bucket(p_job_id uuid)
returns int
language sql immutable strict parallel safe
set search_path = public, pg_temp
as $$
    select ((('x' || substr(md5(lower(p_job_id::text)), 1, 8))::bit(32)::bigint) % 1024)::int
$$;

-- Jump consistent hash (Lamping & Veach 2014), bit-for-bit the reference C++: the 64-bit
-- LCG runs in numeric (bigint would overflow), the division in float8 like the original.
create or replace function soundcheck_jump_hash(p_key bigint, p_buckets int)
returns int
language plpgsql immutable strict parallel safe
set search_path = public, pg_temp
as $$
declare
    k numeric := p_key;
    b bigint := -1;
    j bigint := 0;
begin
    if p_buckets < 1 then
        raise exception 'p_buckets must be at least 1, got %', p_buckets using errcode = '22023';
    end if;
    if k < 0 then
        k := k + 18446744073709551616;
    end if;
    while j < p_buckets loop
        b := j;
        k := mod(k * 2862933555777941757 + 1, 18446744073709551616);
        j := floor((b + 1)::float8 * (2147483648::float8 / (floor(k / 8589934592) + 1)::float8));
    end loop;
    return b;
end
$$;

-- The buckets replica p_replica_id owns under any of the active counts (overlap, never a gap).
create or replace function soundcheck_owned_buckets(p_replica_id int, p_replica_counts int[])
returns int[]
language plpgsql immutable strict parallel safe
set search_path = public, pg_temp
as $$
declare
    v_n int;
begin
    if cardinality(p_replica_counts) = 0 then
        raise exception 'p_replica_counts must not be empty' using errcode = '22023';
    end if;
    foreach v_n in array p_replica_counts loop
        if v_n is null or v_n < 1 then
            raise exception 'p_replica_counts must hold counts of at least 1, got %', v_n
                using errcode = '22023';
        end if;
    end loop;
    if p_replica_id < 0 then
        raise exception 'p_replica_id must be at least 0, got %', p_replica_id
            using errcode = '22023';
    end if;
    return array(
        select b
        from generate_series(0, 1023) as b
        where exists (
            select 1 from unnest(p_replica_counts) as n
            where soundcheck_jump_hash(b, n) = p_replica_id)
        order by b);
end
$$;

-- The live replica that takes over bucket p_bucket (highest random weight; ties: lowest id).
create or replace function soundcheck_rendezvous(p_bucket int, p_live int[])
returns int
language sql immutable parallel safe
set search_path = public, pg_temp
as $$
    select r from unnest(p_live) as r
    order by ('x' || substr(md5(p_bucket::text || '/' || r::text), 1, 8))::bit(32)::bigint desc,
             r
    limit 1
$$;

-- The buckets p_replica_id pings under any of p_counts when p_live (and itself) are up,
-- computed: a jump hash and a rendezvous per bucket, 15 ms of a core whatever the job
-- count. soundcheck_owned_buckets_live keeps its answers.
create or replace function soundcheck_owned_buckets_computed(p_replica_id int, p_counts int[],
                                                         p_live int[])
returns int[]
language plpgsql immutable parallel safe
set search_path = public, pg_temp
as $$
declare
    v_up int[];
begin
    perform soundcheck_owned_buckets(p_replica_id, p_counts);  -- the same argument checks
    -- Itself up too, unless it is outside the topology (then it owns nothing).
    v_up := array(select distinct r from unnest(coalesce(p_live, '{}')
                  || case when p_replica_id < (select max(n) from unnest(p_counts) n)
                          then array[p_replica_id] else '{}'::int[] end) r);
    return array(
        select b
        from generate_series(0, 1023) as b
        where exists (
            select 1
            from unnest(p_counts) as n
            cross join lateral (select soundcheck_jump_hash(b, n) as p) as j
            where case when j.p = any (v_up) then j.p else soundcheck_rendezvous(b, v_up) end
                  = p_replica_id)
        order by b);
end
$$;

-- The buckets p_replica_id pings under any of p_counts when p_live (and itself) are up:
-- kept answers, computed on a miss. Answers are kept in poller_owned_buckets, keyed by
-- all they depend on, so never stale; rows unused for a week are dropped by the next miss.
-- Every fleet sync asks: a quiet one costs 1.7 ms of database time this way, 11 ms when
-- it computed the answer (bench/bench_fleet_scale.py, 10,000 jobs). Volatile: it reads
-- and writes a table.
create or replace function soundcheck_owned_buckets_live(p_replica_id int, p_counts int[],
                                                         p_live int[])
returns int[]
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_live int[] := array(select distinct r from unnest(coalesce(p_live, '{}')) r order by r);
    v_buckets int[];
    v_used timestamptz;
begin
    select m.buckets, m.used_at into v_buckets, v_used
    from poller_owned_buckets m
    where m.replica_id = p_replica_id and m.counts = p_counts and m.live = v_live;
    if found then
        if v_used < now() - interval '1 hour' then  -- a write an hour, not one a sync
            update poller_owned_buckets m set used_at = now()
            where m.replica_id = p_replica_id and m.counts = p_counts and m.live = v_live;
        end if;
        return v_buckets;
    end if;
    v_buckets := soundcheck_owned_buckets_computed(p_replica_id, p_counts, v_live);
    delete from poller_owned_buckets where used_at < now() - interval '7 days';
    insert into poller_owned_buckets (replica_id, counts, live, buckets)
    values (p_replica_id, p_counts, v_live, v_buckets)
    on conflict do nothing;
    return v_buckets;
end
$$;
