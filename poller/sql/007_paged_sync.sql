-- SQL API version 4: owned jobs in pages that no row cap can cut. (The fleet sync that
-- pages, and reports what a poller has applied, is version 5's poller_fleet_sync_live.)
--
-- PostgREST cuts every result at db-max-rows (1,000 on Supabase), set-returning RPCs
-- included, silently. A single jsonb value is one row, so a page is never cut; pages are
-- keyed on the job id (the index jobs_running_real_polling_idx), a stable order.
set local lock_timeout = '5s';

-- Up to p_limit running real_polling jobs in p_buckets with ids above p_after, in id order:
-- {"jobs": [...], "next": <last id> | null}, one JSON value (no row cap cuts it).
create or replace function poller_jobs_in_buckets(p_buckets int[], p_after uuid, p_limit int)
returns jsonb
language plpgsql stable
set search_path = public, pg_temp
as $$
declare
    v_jobs jsonb;
    v_count int;
    v_last uuid;
begin
    if p_limit is null or p_limit not between 1 and 50000 then
        raise exception 'p_limit must be between 1 and 50000, got %', p_limit
            using errcode = '22023';
    end if;
    with page as (
        select j.id, j.target_ip, j.cadence_seconds, j.duration_minutes, j.started_at,
               j.last_ping_at
        from jobs j
        where j.status = 'running' and j.monitoring_mode = 'real_polling'
          and (p_after is null or j.id > p_after)
          -- soundcheck_bucket(j.id), written out: a function with a pinned search_path is
          -- never inlined, and calling it per job tripled the cost of this filter.
          and ((('x' || substr(md5(lower(j.id::text)), 1, 8))::bit(32)::bigint) % 1024)::int
              = any (p_buckets)
        order by j.id
        limit p_limit + 1),  -- one more than asked: tells whether another page follows
    kept as (select * from page order by id limit p_limit)
    select coalesce(jsonb_agg(to_jsonb(kept) order by kept.id), '[]'::jsonb),
           (select count(*) from page), (array_agg(kept.id order by kept.id desc))[1]
    into v_jobs, v_count, v_last
    from kept;
    return jsonb_build_object('jobs', v_jobs,
                              'next', case when v_count > p_limit then v_last end);
end
$$;

-- Up to p_limit running real_polling jobs that replica p_replica_id owns under
-- p_replica_counts, with ids above p_after (null: from the start), in id order.
create or replace function poller_jobs_page(p_replica_id int, p_replica_counts int[],
                                            p_after uuid, p_limit int)
returns jsonb
language plpgsql stable
set search_path = public, pg_temp
as $$
begin
    if p_replica_id is null or p_replica_counts is null then
        raise exception 'p_replica_id and p_replica_counts are required' using errcode = '22023';
    end if;
    return poller_jobs_in_buckets(
        soundcheck_owned_buckets(p_replica_id, p_replica_counts), p_after, p_limit);
end
$$;

do $$ begin
    if to_regprocedure('poller_api_version()') is null or poller_api_version() < 4 then
        create or replace function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 4';
    end if;
end $$;

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (7, '007_paged_sync') on conflict (version) do nothing;
