-- A fleet that starts shares its buckets from the first sync. Before, the first replica
-- up saw no other replica live, took every bucket and read and pinged every job until
-- its next sync (at a million jobs: a full read of all of them, sample buffers
-- overflowing for minutes). Now, while every live replica's process started within the
-- failover timeout, the replicas of the topology not seen yet count as live, as if they
-- had synced when the first one started (tests/support/partition_model.py, `live_replicas`, is the
-- same rule). One that does not come up within the timeout is taken over as a silent one
-- is. Same arguments and answers (API version 7).
set local lock_timeout = '5s';

-- When the replica's process started: its first heartbeat before it applied any sync.
-- Null: from before this migration (long ago, as far as the rule is concerned).
alter table poller_heartbeats add column if not exists started_at timestamptz;

-- Set by a trigger, so the sync functions (and pollers of earlier releases) stay as they
-- were: a process reports no applied sync (applied_at null) until its first full read is
-- taken up, the heartbeats during that read included.
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

do $$ begin
    if not exists (select 1 from pg_trigger where tgrelid = 'poller_heartbeats'::regclass
                   and tgname = 'soundcheck_heartbeat_started') then
        create trigger soundcheck_heartbeat_started
            before insert or update on poller_heartbeats
            for each row execute function soundcheck_heartbeat_started();
    end if;
end $$;

-- Replicas of the fleet that are live now: a heartbeat within the failover timeout, not
-- leaving, inside the topology; while the fleet starts, every replica of the topology
-- but those leaving now.
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

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (12, '012_fleet_start') on conflict (version) do nothing;
