-- SQL API version 2: adds what the fleet operator reads. Additive; version 1 callers
-- (pollers) keep working.
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

-- Never lowers a newer version when this file is pasted again.
do $$ begin
    if to_regprocedure('poller_api_version()') is null or poller_api_version() < 2 then
        create or replace function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 2';
    end if;
end $$;

insert into soundcheck_migrations (version, name)
values (3, '003_fleet_api') on conflict (version) do nothing;
