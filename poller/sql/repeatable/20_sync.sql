-- A poller's read of its jobs: pages of the running real-polling jobs in its buckets, and
-- the changes since its last read (docs/architecture.md, "Incremental sync").
insert into soundcheck_repeatables (name, revision) values ('20_sync', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';

-- The running real_polling jobs that replica p_replica_id owns under p_replica_counts, in
-- one answer (API version 1; PostgREST cuts it at db-max-rows: pollers of this release
-- read pages instead).
create or replace function poller_sync_jobs(p_replica_id int, p_replica_counts int[])
returns table (
    id uuid, target_ip text, cadence_seconds int, duration_minutes int,
    started_at timestamptz, last_ping_at timestamptz)
language plpgsql stable
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
    v_buckets int[];
begin
    if p_replica_id is null or p_replica_counts is null then
        raise exception 'p_replica_id and p_replica_counts are required' using errcode = '22023';
    end if;
    v_buckets := soundcheck_owned_buckets(p_replica_id, p_replica_counts);
    return query
        select j.id, j.target_ip, j.cadence_seconds, j.duration_minutes, j.started_at,
               j.last_ping_at
        from jobs j
        where j.status = 'running' and j.monitoring_mode = 'real_polling'
          and soundcheck_bucket(j.id) = any (v_buckets);
end
$$;

-- A page of the running real_polling jobs that replica p_replica_id owns under
-- p_replica_counts, after the job p_after (null: from the start). One jsonb value, so no
-- row cap (PostgREST's db-max-rows, 1,000 on Supabase) can cut it.
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

-- A page of the running real-polling jobs in some buckets, in (bucket, id) order, after
-- the job `p_after` (the cursor: the last id of the previous page; its bucket is derived).
-- One range scan per bucket of the index jobs_running_bucket_idx (migration 011), from
-- the cursor's bucket on, until the page is full: a page costs what the replica's own
-- buckets hold, not the fleet's jobs. The bucket is soundcheck_bucket(id) written out,
-- as the index writes it: the planner matches an expression index only on the same
-- expression, and never looks inside a function.
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

-- Each change of jobs that matters to a poller (a real-polling job inserted, deleted, or
-- with a new status, cadence, duration, target, start or mode), with the id of the
-- transaction that made it. A poller keeps a cursor: the oldest transaction still running
-- when it last read (pg_snapshot_xmin). Every change of a transaction at or after the
-- cursor is read again at the next sync, so a change committed late, after younger ones
-- were read, is never missed; one read twice is applied twice, which is harmless (the
-- poller takes the job's current row). The triggers run as their owner (SECURITY
-- DEFINER): the app's users, who insert and edit jobs, have no rights on poller tables.
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

create or replace trigger soundcheck_job_inserted after insert on jobs for each row
    when (new.monitoring_mode = 'real_polling')
    execute function soundcheck_job_changed();

-- UPDATE OF: the poller's own writes (last_ping_at, the alert cursor) never fire it.
create or replace trigger soundcheck_job_updated
    after update of status, cadence_seconds, duration_minutes, target_ip, started_at,
                    monitoring_mode on jobs
    for each row
    when ((old.monitoring_mode = 'real_polling' or new.monitoring_mode = 'real_polling')
          and (old.status, old.cadence_seconds, old.duration_minutes, old.target_ip,
               old.started_at, old.monitoring_mode)
              is distinct from (new.status, new.cadence_seconds, new.duration_minutes,
                                new.target_ip, new.started_at, new.monitoring_mode))
    execute function soundcheck_job_changed();

create or replace trigger soundcheck_job_deleted after delete on jobs for each row
    when (old.monitoring_mode = 'real_polling')
    execute function soundcheck_job_changed();

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
