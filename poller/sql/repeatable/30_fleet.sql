-- Fleets: the topology the operator publishes, each replica's heartbeat, who is live, and
-- the fleet sync that brings it all to a poller in one round trip.
insert into soundcheck_repeatables (name, revision) values ('30_fleet', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';

-- The load the operator sizes the fleet from: running real_polling jobs, and how many
-- pings per second they ask for.
create or replace function poller_fleet_load()
returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
    select jsonb_build_object(
        'running_jobs', count(*),
        'pings_per_second', coalesce(round(sum(1.0 / nullif(cadence_seconds, 0)), 3), 0))
    from jobs
    where status = 'running' and monitoring_mode = 'real_polling'
$$;

-- The operator publishes the active replica counts; the epoch moves only on a change.
create or replace function poller_publish_topology(p_fleet text, p_counts int[])
returns bigint
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_epoch bigint;
begin
    if p_fleet is null or p_counts is null or cardinality(p_counts) not between 1 and 2
       or exists (select 1 from unnest(p_counts) n where n is null or n < 1) then
        raise exception 'p_counts must hold one or two counts of at least 1, got %', p_counts
            using errcode = '22023';
    end if;
    insert into poller_topology as t (fleet, counts)
    values (p_fleet, p_counts)
    on conflict (fleet) do update
        set counts = excluded.counts, epoch = t.epoch + 1, updated_at = now()
        where t.counts is distinct from excluded.counts
    returning epoch into v_epoch;
    if v_epoch is null then
        select epoch into v_epoch from poller_topology where fleet = p_fleet;
    end if;
    return v_epoch;
end
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

-- A poller's sync in a fleet: the topology to apply, its heartbeat recorded, its jobs
-- (API version 3, no failover; pollers of this release call poller_fleet_sync_delta).
create or replace function poller_sync_fleet(p_fleet text, p_replica_id int, p_owned_jobs int,
                                             p_version text)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_counts int[];
    v_epoch bigint;
    v_jobs jsonb;
begin
    select counts, epoch into v_counts, v_epoch from poller_topology where fleet = p_fleet;
    if not found then
        raise exception 'no topology published for fleet %', p_fleet
            using errcode = 'P0002', hint = 'the operator publishes it when it creates the fleet';
    end if;
    insert into poller_heartbeats as h (fleet, replica_id, counts, epoch, owned_jobs, version)
    values (p_fleet, p_replica_id, v_counts, v_epoch, coalesce(p_owned_jobs, 0),
            coalesce(p_version, ''))
    on conflict (fleet, replica_id) do update
        set counts = excluded.counts, epoch = excluded.epoch, owned_jobs = excluded.owned_jobs,
            version = excluded.version, seen_at = now();
    select coalesce(jsonb_agg(to_jsonb(j)), '[]'::jsonb) into v_jobs
    from poller_sync_jobs(p_replica_id, v_counts) as j;
    return jsonb_build_object('counts', to_jsonb(v_counts), 'epoch', v_epoch, 'jobs', v_jobs);
end
$$;

-- When the replica's process started (poller_heartbeats.started_at), for the rule of a
-- fleet that starts (poller_live_replicas). Set by a trigger, so the sync functions (and
-- pollers of earlier releases) need not say it: a process reports no applied sync
-- (applied_at null) until its first full read is taken up, the heartbeats during that
-- read included.
create or replace function soundcheck_heartbeat_started()
returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
    -- A new process: one that has applied no sync yet, where the row was of a process that
    -- had (or is missing, or silent past the failover timeout). Otherwise it stays as set.
    if new.applied_at is null
       and (tg_op = 'INSERT' or old.applied_at is not null
            or old.seen_at < now() - make_interval(secs => coalesce(
                   (select t.failover_s from poller_topology t where t.fleet = new.fleet), 15)))
    then
        new.started_at := now();
    end if;
    return new;
end
$$;

create or replace trigger soundcheck_heartbeat_started
    before insert or update on poller_heartbeats
    for each row execute function soundcheck_heartbeat_started();

-- Replicas of the fleet that are live now: a heartbeat within the failover timeout, not
-- leaving, inside the topology. While the fleet starts (every live replica's process
-- started within the failover timeout), every replica of the topology but those leaving
-- now: so the first replica up does not take every bucket and read every job until its
-- next sync. One that does not come up within the timeout is taken over as a silent one
-- is. tests/support/partition_model.py, `live_replicas`, is the same rule.
create or replace function poller_live_replicas(p_fleet text)
returns int[]
language sql stable
set search_path = public, pg_temp
as $$
    with t as (
        select t.failover_s, (select max(n) from unnest(t.counts) as n) as size
        from poller_topology t where t.fleet = p_fleet
    ),
    fresh as (
        select h.replica_id, h.leaving_since is not null as leaving,
               coalesce(h.started_at, '-infinity') >= now() - make_interval(secs => t.failover_s)
               as started_lately
        from poller_heartbeats h, t
        where h.fleet = p_fleet
          and h.seen_at >= now() - make_interval(secs => t.failover_s)
          and h.replica_id < t.size
    ),
    starting as (
        select exists (select 1 from fresh where not leaving)
               and not exists (select 1 from fresh where not leaving and not started_lately)
               as yes
    )
    select coalesce(array_agg(r order by r), '{}')
    from t, generate_series(0, t.size - 1) as r
    where r in (select replica_id from fresh where not leaving)
       or ((select yes from starting)
           and r not in (select replica_id from fresh where leaving))
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

-- A poller's sync in a fleet (poller_fleet_sync_live: heartbeat, topology, live replicas,
-- buckets) with only what changed in its buckets since p_cursor; a full read when its
-- buckets are not p_buckets (the topology or the live set moved) or p_cursor is null.
create or replace function poller_fleet_sync_delta(
    p_fleet text, p_replica_id int, p_applied_epoch bigint, p_applied_counts int[],
    p_applied_at timestamptz, p_leaving bool, p_owned_jobs int, p_version text, p_limit int,
    p_cursor xid8, p_buckets int[])
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_sync jsonb;
    v_buckets int[];
begin
    -- One job asked for: its page is dropped here, the jobs come from the changes.
    v_sync := poller_fleet_sync_live(p_fleet, p_replica_id, p_applied_epoch,
                                     p_applied_counts, p_applied_at, p_leaving, p_owned_jobs,
                                     p_version, 1) - 'jobs' - 'next';
    v_buckets := array(select jsonb_array_elements_text(v_sync->'buckets')::int);
    return v_sync || poller_job_changes(
        v_buckets,
        case when v_buckets = coalesce(p_buckets, '{}') then p_cursor end,
        p_limit);
end
$$;

-- The operator's view of a fleet: topology, heartbeats, and the running and stale jobs
-- counted in one pass.
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
