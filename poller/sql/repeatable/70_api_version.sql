-- The SQL API's version, which pollers and the operator check at start (docs/sql-api.md,
-- "The SQL API"): raised when the API gains a function or an argument, never lowered.
-- 7: the incremental fleet sync (poller_fleet_sync_delta).
insert into soundcheck_repeatables (name, revision) values ('70_api_version', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;

create or replace function poller_api_version() returns int language sql immutable
    set search_path = public, pg_temp as 'select 7';
