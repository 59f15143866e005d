-- SQL API version 4: owned jobs in pages that no row cap can cut, and heartbeats that say
-- which topology a poller has applied rather than which one it was served.
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

-- A fleet poller's sync: records its heartbeat with the topology it has *applied* (the one
-- of its previous sync, after its scheduler took it up), and returns the topology to apply
-- now with the first page of its jobs. The operator moves a handover on only when every
-- replica reports the new epoch as applied, so a lost reply cannot make it shrink early.
create or replace function poller_fleet_sync(p_fleet text, p_replica_id int,
                                             p_applied_epoch bigint, p_applied_counts int[],
                                             p_owned_jobs int, p_version text, p_limit int)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_counts int[];
    v_epoch bigint;
begin
    select counts, epoch into v_counts, v_epoch from poller_topology where fleet = p_fleet;
    if not found then
        raise exception 'no topology published for fleet %', p_fleet
            using errcode = 'P0002', hint = 'the operator publishes it when it creates the fleet';
    end if;
    insert into poller_heartbeats as h (fleet, replica_id, counts, epoch, owned_jobs, version)
    values (p_fleet, p_replica_id, coalesce(p_applied_counts, '{}'),
            coalesce(p_applied_epoch, 0), coalesce(p_owned_jobs, 0), coalesce(p_version, ''))
    on conflict (fleet, replica_id) do update
        set counts = excluded.counts, epoch = excluded.epoch, owned_jobs = excluded.owned_jobs,
            version = excluded.version, seen_at = now();
    return poller_jobs_page(p_replica_id, v_counts, null, p_limit)
        || jsonb_build_object('counts', to_jsonb(v_counts), 'epoch', v_epoch);
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
