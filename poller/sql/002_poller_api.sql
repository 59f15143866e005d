-- The poller's SQL API, version 1. Additive: new functions only.
set local lock_timeout = '5s';
--
-- The poller (and the operator) call only these functions, over asyncpg or as PostgREST
-- RPCs (POST /rest/v1/rpc/<name>), so both transports behave the same.

-- Partitioning (docs/architecture.md, "How it works") ----------------------------------------------------

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

-- The unique key on samples (job_id, sequence_number) and the index of running jobs are
-- built by 005_online_indexes.sql, concurrently, outside a transaction: building them here
-- would block the app's writes to samples and jobs for as long as the build takes.

-- The API ---------------------------------------------------------------------------------

-- Created only where absent: pasting this file again must not lower a newer version.
do $$ begin
    if to_regprocedure('poller_api_version()') is null then
        create function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 1';
    end if;
end $$;

-- The running real_polling jobs that replica p_replica_id owns under p_replica_counts.
create or replace function poller_sync_jobs(p_replica_id int, p_replica_counts int[])
returns table (
    id uuid, target_ip text, cadence_seconds int, duration_minutes int,
    started_at timestamptz, last_ping_at timestamptz)
language plpgsql stable
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
    v_buckets int[];
begin
    if p_replica_id is null or p_replica_counts is null then
        raise exception 'p_replica_id and p_replica_counts are required' using errcode = '22023';
    end if;
    v_buckets := soundcheck_owned_buckets(p_replica_id, p_replica_counts);
    return query
        select j.id, j.target_ip, j.cadence_seconds, j.duration_minutes, j.started_at,
               j.last_ping_at
        from jobs j
        where j.status = 'running' and j.monitoring_mode = 'real_polling'
          and soundcheck_bucket(j.id) = any (v_buckets);
end
$$;

-- One round trip per batch: insert the samples (duplicates absorbed), move last_ping_at,
-- complete the expired jobs asked for and build their rollups. The completing UPDATE takes
-- the row lock and re-checks status = 'running', so of two replicas racing exactly one
-- completes a job and builds its rollups.
create or replace function poller_record_batch(
    p_job_ids uuid[],
    p_sequence_numbers int[],
    p_statuses text[],
    p_rtt_ms float8[],
    p_jitter_ms float8[],
    p_recorded_at timestamptz[],
    p_complete_job_ids uuid[] default '{}')
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_n int := coalesce(cardinality(p_job_ids), 0);
    v_inserted int;
    v_completed uuid[] := '{}';
    v_id uuid;
begin
    if coalesce(cardinality(p_sequence_numbers), 0) <> v_n
       or coalesce(cardinality(p_statuses), 0) <> v_n
       or coalesce(cardinality(p_rtt_ms), 0) <> v_n
       or coalesce(cardinality(p_jitter_ms), 0) <> v_n
       or coalesce(cardinality(p_recorded_at), 0) <> v_n then
        raise exception 'p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms and p_recorded_at must each have as many elements as p_job_ids (%)', v_n
            using errcode = '22023';
    end if;

    insert into samples (job_id, sequence_number, status, rtt_ms, jitter_ms, recorded_at)
    select u.job_id, u.seq, u.status::sample_status, round(u.rtt::numeric, 2),
           round(u.jitter::numeric, 2), u.ts
    from unnest(p_job_ids, p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms, p_recorded_at)
         as u(job_id, seq, status, rtt, jitter, ts)
    -- A job deleted while its samples were buffered: drop them rather than fail the batch.
    where exists (select 1 from jobs j where j.id = u.job_id)
    on conflict (job_id, sequence_number) do nothing;
    get diagnostics v_inserted = row_count;

    update jobs j
    set last_ping_at = m.ts
    from (select u.job_id, max(u.ts) as ts
          from unnest(p_job_ids, p_recorded_at) as u(job_id, ts)
          group by u.job_id
          order by u.job_id) as m
    where j.id = m.job_id and (j.last_ping_at is null or j.last_ping_at < m.ts);

    for v_id in
        update jobs
        set status = 'completed', completed_at = now()
        where id = any (coalesce(p_complete_job_ids, '{}'))
          and status = 'running'
          and started_at + make_interval(mins => duration_minutes) <= now()
        returning id
    loop
        perform create_job_rollups(v_id);
        v_completed := v_completed || v_id;
    end loop;

    return jsonb_build_object('inserted', v_inserted, 'completed', to_jsonb(v_completed));
end
$$;

-- Who may call these (the service role only) is settled by 006_lock_down.sql, which every
-- later migration re-applies.

insert into soundcheck_migrations (version, name)
values (2, '002_poller_api') on conflict (version) do nothing;
