-- SQL API version 7: syncs that cost what changed. A trigger on jobs records each change
-- that matters to a poller (a real-polling job inserted, deleted, or with a new status,
-- cadence, duration, target, start or mode) with the id of the transaction that made it.
-- A poller keeps a cursor: the oldest transaction still running when it last read
-- (pg_snapshot_xmin). Every change of a transaction at or after the cursor is read again
-- at the next sync, so a change committed late, after younger ones were read, is never
-- missed; a change read twice is applied twice, which is harmless (the poller takes the
-- job's current row). A sync with nothing changed returns no job and costs one index probe.
--
-- Additive: a table, three triggers on jobs (created only where missing), new functions.
-- The triggers run as their owner (SECURITY DEFINER): the app's users, who insert and edit
-- jobs, have no rights on poller tables and need none.
set local lock_timeout = '5s';

create table if not exists poller_job_changes (
    xid    xid8 not null,
    job_id uuid not null,
    bucket int not null,
    at     timestamptz not null default now()
);
create index if not exists poller_job_changes_xid on poller_job_changes (xid);
create index if not exists poller_job_changes_at on poller_job_changes (at);

create or replace function soundcheck_job_changed()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    v_id uuid := case when tg_op = 'DELETE' then old.id else new.id end;
begin
    insert into poller_job_changes (xid, job_id, bucket)
    values (pg_current_xact_id(), v_id, soundcheck_bucket(v_id));
    return null;
end
$$;

do $$ begin
    if not exists (select 1 from pg_trigger where tgrelid = 'jobs'::regclass
                   and tgname = 'soundcheck_job_inserted') then
        create trigger soundcheck_job_inserted after insert on jobs for each row
            when (new.monitoring_mode = 'real_polling')
            execute function soundcheck_job_changed();
    end if;
    -- UPDATE OF: the poller's own writes (last_ping_at, the alert cursor) never fire it.
    if not exists (select 1 from pg_trigger where tgrelid = 'jobs'::regclass
                   and tgname = 'soundcheck_job_updated') then
        create trigger soundcheck_job_updated
            after update of status, cadence_seconds, duration_minutes, target_ip, started_at,
                            monitoring_mode on jobs
            for each row
            when ((old.monitoring_mode = 'real_polling' or new.monitoring_mode = 'real_polling')
                  and (old.status, old.cadence_seconds, old.duration_minutes, old.target_ip,
                       old.started_at, old.monitoring_mode)
                      is distinct from (new.status, new.cadence_seconds, new.duration_minutes,
                                        new.target_ip, new.started_at, new.monitoring_mode))
            execute function soundcheck_job_changed();
    end if;
    if not exists (select 1 from pg_trigger where tgrelid = 'jobs'::regclass
                   and tgname = 'soundcheck_job_deleted') then
        create trigger soundcheck_job_deleted after delete on jobs for each row
            when (old.monitoring_mode = 'real_polling')
            execute function soundcheck_job_changed();
    end if;
end $$;

-- The jobs of p_buckets that changed since p_cursor: {full: false, jobs (their current
-- rows, running real-polling ones), gone (the others: stop pinging them), cursor}. With no
-- cursor, one this database cannot honour (from after its present: a restore), or more
-- than p_limit changes: {full: true, cursor} and the first page of a full read
-- (poller_jobs_in_buckets for the next pages). The cursor of a full read is taken before
-- its first page, so what changes while it pages is read again.
--
-- Changes are kept a day. A poller reads them every few seconds, and does a full read
-- after a long break (docs/architecture.md, "Incremental sync"); only a transaction that changed jobs
-- and stayed open for a day could have its changes dropped before they were read.
create or replace function poller_job_changes(p_buckets int[], p_cursor xid8, p_limit int)
returns jsonb
language plpgsql
set search_path = public, pg_temp
-- Planned for the actual cursor each time: a generic plan guesses that a third of the
-- changes match and scans them all (46 ms at 250,000 rows) instead of one index probe.
set plan_cache_mode = force_custom_plan
as $$
declare
    v_snapshot pg_snapshot := pg_current_snapshot();
    v_cursor xid8 := pg_snapshot_xmin(v_snapshot);
    v_changed uuid[];
    v_rows int;
    v_out jsonb;
begin
    if p_limit is null or p_limit not between 1 and 50000 then
        raise exception 'p_limit must be between 1 and 50000, got %', p_limit
            using errcode = '22023';
    end if;
    -- A few old changes dropped by whoever syncs: no job of its own to run.
    -- (Oldest first, through the index on `at`: a plain filter, with no statistics after
    -- a burst of new jobs, was planned as a scan of the whole table on every sync.)
    delete from poller_job_changes
    where ctid in (select ctid from poller_job_changes
                   where at < now() - interval '1 day'
                   order by at limit 500 for update skip locked);
    if p_cursor is not null and p_cursor <= pg_snapshot_xmax(v_snapshot) then
        select array_agg(distinct c.job_id), count(*) into v_changed, v_rows
        from (select job_id from poller_job_changes
              -- Bounded on both sides (nothing past the snapshot is visible anyway): with
              -- no statistics yet, after a burst of new jobs, the planner still takes the
              -- index for a closed range.
              where xid between p_cursor and pg_snapshot_xmax(v_snapshot)
                and bucket = any (p_buckets)
              limit p_limit + 1) c;
        if v_rows <= p_limit then
            with cur as (
                select j.id, j.target_ip, j.cadence_seconds, j.duration_minutes,
                       j.started_at, j.last_ping_at
                from jobs j
                where j.id = any (coalesce(v_changed, '{}'))
                  and j.status = 'running' and j.monitoring_mode = 'real_polling')
            select jsonb_build_object(
                'jobs', coalesce((select jsonb_agg(to_jsonb(cur) order by cur.id) from cur),
                                 '[]'),
                'gone', coalesce((select jsonb_agg(x order by x)
                                  from unnest(v_changed) x
                                  where x not in (select id from cur)), '[]'))
            into v_out;
            return v_out || jsonb_build_object('full', false, 'cursor', v_cursor::text);
        end if;
    end if;
    return poller_jobs_in_buckets(p_buckets, null, p_limit)
        || jsonb_build_object('full', true, 'cursor', v_cursor::text);
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

do $$ begin
    if to_regprocedure('poller_api_version()') is null or poller_api_version() < 7 then
        create or replace function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 7';
    end if;
end $$;

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (10, '010_incremental_sync') on conflict (version) do nothing;
