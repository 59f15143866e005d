-- SQL API version 3: fleet topology and heartbeats, so a fleet changes size without gaps.
-- Additive; pollers without FLEET_NAME keep using poller_sync_jobs.
set local lock_timeout = '5s';

create table if not exists poller_topology (
    fleet      text primary key,
    counts     int[] not null check (cardinality(counts) between 1 and 2),
    epoch      bigint not null default 1,
    updated_at timestamptz not null default now()
);

create table if not exists poller_heartbeats (
    fleet      text not null,
    replica_id int not null,
    counts     int[] not null,
    epoch      bigint not null,
    owned_jobs int not null,
    version    text not null,
    seen_at    timestamptz not null default now(),
    primary key (fleet, replica_id)
);

-- No policies: only roles that bypass row level security (service role, postgres) see them.
alter table poller_topology enable row level security;
alter table poller_heartbeats enable row level security;

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

-- A poller's sync in a fleet: the topology to apply, its heartbeat recorded, its jobs.
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

-- What the operator needs to hand over and to report: topology, who has seen which epoch,
-- and running jobs with no sample for more than twice their cadence.
create or replace function poller_fleet_state(p_fleet text)
returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
    select jsonb_build_object(
        'counts', (select to_jsonb(counts) from poller_topology where fleet = p_fleet),
        'epoch', (select epoch from poller_topology where fleet = p_fleet),
        'replicas', coalesce((
            select jsonb_agg(jsonb_build_object(
                'replica_id', replica_id, 'epoch', epoch, 'counts', counts,
                'owned_jobs', owned_jobs, 'version', version,
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

-- Never lowers a newer version when this file is pasted again.
do $$ begin
    if to_regprocedure('poller_api_version()') is null or poller_api_version() < 3 then
        create or replace function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 3';
    end if;
end $$;

insert into soundcheck_migrations (version, name)
values (4, '004_topology') on conflict (version) do nothing;
