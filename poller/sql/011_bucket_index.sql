-- soundcheck-migrate: no-transaction
--
-- Full reads through an index of each running job's bucket. Before, a replica's full read
-- walked every running job in id order and hashed each one to keep its own: at a million
-- jobs a page of 5,000 cost 70-80 ms, and the whole read grew with the fleet's jobs, not
-- the replica's. With this index a page is a range scan of the replica's own buckets.
--
-- CONCURRENTLY, so the app keeps writing jobs while it builds (see 005); run the statements
-- one at a time in the Supabase SQL editor. The index holds only the job's id and its
-- bucket, which never change: updates of last_ping_at stay HOT (no index write).

set lock_timeout = '5s';

-- A build that failed leaves an INVALID index: drop it so the build below starts again.
do $$
declare
    v_index regclass := to_regclass('jobs_running_bucket_idx');
begin
    if v_index is not null
       and not (select indisvalid from pg_index where indexrelid = v_index) then
        raise notice 'dropping % (an invalid index left by a failed build)', v_index;
        execute format('drop index %s', v_index);
    end if;
end
$$;

set lock_timeout = 0;

-- The expression is soundcheck_bucket(id) written out, as the query below writes it: the
-- planner matches an expression index only on the same expression, and never looks
-- inside a function.
create index concurrently if not exists jobs_running_bucket_idx
    on jobs ((((('x' || substr(md5(lower(id::text)), 1, 8))::bit(32)::bigint) % 1024)::int), id)
    where status = 'running' and monitoring_mode = 'real_polling';

-- A page of the running real-polling jobs in some buckets, in (bucket, id) order, after
-- the job `p_after` (the cursor: the last id of the previous page; its bucket is derived).
-- One index range scan per bucket, from the cursor's bucket on, until the page is full.
-- Same arguments and answer as before (007); only the order of the pages changed.
create or replace function poller_jobs_in_buckets(p_buckets int[], p_after uuid, p_limit int)
returns jsonb
language plpgsql stable
set search_path = public, pg_temp
-- One plan for the per-bucket query (an index range scan whatever the bucket): planning it
-- anew for each of up to 1,024 buckets cost three times the scan in a small fleet.
set plan_cache_mode = force_generic_plan
as $$
declare
    v_from int := -1;
    v_after uuid;  -- the cursor, within its own bucket only
    v_bucket int;
    v_parts jsonb[] := '{}';  -- each bucket's rows; appending to an array is cheap, to a
    v_part jsonb;             -- jsonb value a copy of all of it (quadratic over a page)
    v_jobs jsonb;
    v_count int := 0;
    v_got int;
begin
    if p_limit is null or p_limit not between 1 and 50000 then
        raise exception 'p_limit must be between 1 and 50000, got %', p_limit
            using errcode = '22023';
    end if;
    if p_after is not null then
        v_from := soundcheck_bucket(p_after);
    end if;
    for v_bucket in select distinct b from unnest(p_buckets) as b where b >= v_from order by b
    loop
        if v_bucket = v_from then
            v_after := p_after;
        end if;
        -- One more than asked for in all: tells whether another page follows.
        select coalesce(jsonb_agg(to_jsonb(r) order by r.id), '[]'::jsonb), count(*)
        into v_part, v_got
        from (select j.id, j.target_ip, j.cadence_seconds, j.duration_minutes, j.started_at,
                     j.last_ping_at
              from jobs j
              where j.status = 'running' and j.monitoring_mode = 'real_polling'
                and ((('x' || substr(md5(lower(j.id::text)), 1, 8))::bit(32)::bigint)
                     % 1024)::int = v_bucket
                and (v_after is null or j.id > v_after)
              order by j.id
              limit p_limit + 1 - v_count) as r;
        v_after := null;
        if v_got > 0 then
            v_parts := array_append(v_parts, v_part);
        end if;
        v_count := v_count + v_got;
        exit when v_count > p_limit;
    end loop;
    select coalesce(jsonb_agg(e.job order by p.i, e.k), '[]'::jsonb) into v_jobs
    from unnest(v_parts) with ordinality as p(part, i)
    cross join lateral jsonb_array_elements(p.part) with ordinality as e(job, k);
    if v_count > p_limit then
        v_jobs := v_jobs - (-1);
        return jsonb_build_object('jobs', v_jobs, 'next', v_jobs -> (-1) -> 'id');
    end if;
    return jsonb_build_object('jobs', v_jobs, 'next', null);
end
$$;

-- The operator's view of a fleet: one pass over the running jobs for both counts (it was
-- two), the rest as before (008).
create or replace function poller_fleet_state(p_fleet text)
returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
    select jsonb_build_object(
        'counts', (select to_jsonb(counts) from poller_topology where fleet = p_fleet),
        'epoch', (select epoch from poller_topology where fleet = p_fleet),
        'failover_s', (select failover_s from poller_topology where fleet = p_fleet),
        'replicas', coalesce((
            select jsonb_agg(jsonb_build_object(
                'replica_id', replica_id, 'epoch', epoch, 'counts', counts,
                'owned_jobs', owned_jobs, 'version', version,
                'leaving', leaving_since is not null,
                'age_s', round(extract(epoch from now() - seen_at)::numeric, 3))
                order by replica_id)
            from poller_heartbeats where fleet = p_fleet), '[]'::jsonb),
        'running_jobs', load.running,
        'stale_jobs', load.stale)
    from (select count(*) as running,
                 count(*) filter (
                     where coalesce(last_ping_at, started_at)
                           < now() - make_interval(secs => 2 * cadence_seconds)) as stale
          from jobs
          where status = 'running' and monitoring_mode = 'real_polling') as load
$$;

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (11, '011_bucket_index') on conflict (version) do nothing;
