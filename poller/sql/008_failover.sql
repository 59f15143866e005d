-- SQL API version 5: failover. A bucket whose primary replica is not live (leaving, or
-- silent longer than the fleet's failover timeout) is pinged by the live replica that wins
-- the rendezvous hash of bucket and replica (tests/support/partition_model.py mirrors these functions);
-- a leaving replica learns when the others have taken its share. Additive: heartbeats and
-- topology gain columns, earlier functions stay for pollers of earlier releases.
set local lock_timeout = '5s';

alter table poller_heartbeats add column if not exists leaving_since timestamptz;
alter table poller_heartbeats add column if not exists applied_at timestamptz;
alter table poller_topology add column if not exists failover_s int not null default 15;

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

-- The buckets p_replica_id pings under any of p_counts when p_live (and itself) are up.
create or replace function soundcheck_owned_buckets_live(p_replica_id int, p_counts int[],
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

-- Replicas of the fleet that are live now: a heartbeat within the failover timeout, not
-- leaving, and inside the topology.
create or replace function poller_live_replicas(p_fleet text)
returns int[]
language sql stable
set search_path = public, pg_temp
as $$
    select coalesce(array_agg(h.replica_id order by h.replica_id), '{}')
    from poller_heartbeats h
    join poller_topology t on t.fleet = h.fleet
    where h.fleet = p_fleet
      and h.leaving_since is null
      and h.seen_at >= now() - make_interval(secs => t.failover_s)
      and h.replica_id < (select max(n) from unnest(t.counts) as n)
$$;

-- A fleet poller's sync with failover. Records its heartbeat (the topology and the sync
-- time it has applied; leaving or not), and returns the topology, the live replicas, the
-- first page of the jobs it pings, the server time of this sync (to report as applied
-- next time) and, for a leaving replica, whether every live replica has applied a sync
-- made after it started leaving (its share is taken: it may stop).
create or replace function poller_fleet_sync_live(
    p_fleet text, p_replica_id int, p_applied_epoch bigint, p_applied_counts int[],
    p_applied_at timestamptz, p_leaving bool, p_owned_jobs int, p_version text, p_limit int)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_counts int[];
    v_epoch bigint;
    v_failover int;
    v_live int[];
    v_leaving timestamptz;
    v_taken bool := false;
    v_buckets int[];
begin
    select counts, epoch, failover_s into v_counts, v_epoch, v_failover
    from poller_topology where fleet = p_fleet;
    if not found then
        raise exception 'no topology published for fleet %', p_fleet
            using errcode = 'P0002', hint = 'the operator publishes it when it creates the fleet';
    end if;
    insert into poller_heartbeats as h (fleet, replica_id, counts, epoch, owned_jobs, version,
                                        applied_at, leaving_since)
    values (p_fleet, p_replica_id, coalesce(p_applied_counts, '{}'),
            coalesce(p_applied_epoch, 0), coalesce(p_owned_jobs, 0), coalesce(p_version, ''),
            p_applied_at, case when p_leaving then now() end)
    on conflict (fleet, replica_id) do update
        set counts = excluded.counts, epoch = excluded.epoch, owned_jobs = excluded.owned_jobs,
            version = excluded.version, seen_at = now(), applied_at = excluded.applied_at,
            leaving_since = case when p_leaving then coalesce(h.leaving_since, now()) end
    returning leaving_since into v_leaving;
    v_live := poller_live_replicas(p_fleet);
    if p_leaving then
        v_taken := not exists (
            select 1 from poller_heartbeats h
            where h.fleet = p_fleet and h.replica_id = any (v_live)
              and (h.applied_at is null or h.applied_at <= v_leaving));
    end if;
    v_buckets := soundcheck_owned_buckets_live(p_replica_id, v_counts, v_live);
    return poller_jobs_in_buckets(v_buckets, null, p_limit)
        || jsonb_build_object('counts', to_jsonb(v_counts), 'epoch', v_epoch,
                              'buckets', to_jsonb(v_buckets),
                              'live', to_jsonb(v_live), 'failover_s', v_failover,
                              'now', now(), 'taken_over', v_taken);
end
$$;

-- What the operator reads each sync, now with the failover timeout and, per replica,
-- whether it is leaving and how long ago it applied a sync.
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
        'running_jobs', (select count(*) from jobs
                         where status = 'running' and monitoring_mode = 'real_polling'),
        'stale_jobs', (select count(*) from jobs
                       where status = 'running' and monitoring_mode = 'real_polling'
                         and coalesce(last_ping_at, started_at)
                             < now() - make_interval(secs => 2 * cadence_seconds)))
$$;

-- The operator sets each fleet's failover timeout (spec.failoverTimeoutSeconds).
create or replace function poller_set_failover(p_fleet text, p_failover_s int)
returns void
language sql
set search_path = public, pg_temp
as $$
    update poller_topology set failover_s = greatest(1, p_failover_s)
    where fleet = p_fleet and failover_s is distinct from greatest(1, p_failover_s)
$$;

do $$ begin
    if to_regprocedure('poller_api_version()') is null or poller_api_version() < 5 then
        create or replace function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 5';
    end if;
end $$;

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (8, '008_failover') on conflict (version) do nothing;
