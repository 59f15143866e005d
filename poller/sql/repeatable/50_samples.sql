-- Writing samples: one round trip records a whole batch.
insert into soundcheck_repeatables (name, revision) values ('50_samples', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';

-- A batch of samples (the arrays are its columns): inserted (a duplicate absorbed), each
-- job's last_ping_at moved, its alerts evaluated (40_alerts.sql), the expired jobs asked
-- for completed with their rollups and completion notice. Returns {inserted, completed,
-- offline, recovery, late}.
--
-- Sample ids in time order: the app's default for samples.id is a random UUID, so each
-- sample would land on a random page of the primary key's index, which soon outgrows the
-- cache of hot pages; with full-page writes on (every production server) each first
-- write to a page after a checkpoint logs the whole page. A UUID whose first 48 bits are
-- the ping's time in milliseconds (the layout of UUID version 7, RFC 9562) appends at the
-- index's right edge instead: made from a random version 4 UUID, its first six bytes
-- replaced and two version bits set. Written out, not a helper function: a function with
-- its own search_path is not inlined, and a call per row costs what this saves. Measured
-- with 1,000,000 running jobs and 2 writers on a server without full-page writes, so
-- locality alone: Postgres CPU per sample 37-43 us against 40-46 us.
--
-- Late samples: a completed job keeps the samples its rollups and completion notice were
-- made from. A sample can reach the database after its job was completed (a frozen pod
-- that writes its buffer when it thaws, a replica whose batch raced the completing one):
-- it is refused, what this batch inserted for a job completed while it ran is taken out
-- again, and both are counted as `late` (soundcheck_poller_samples_late_total). Samples
-- of the batch that completes a job are written before the completion. Cost on a batch
-- of new samples: within 2 % (bench/bench_record_versions.py).
create or replace function poller_record_samples(
    p_job_ids uuid[],
    p_sequence_numbers int[],
    p_statuses text[],
    p_rtt_ms float8[],
    p_jitter_ms float8[],
    p_recorded_at timestamptz[],
    p_complete_job_ids uuid[] default '{}',
    p_settle_s int default 60)
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_n int := coalesce(cardinality(p_job_ids), 0);
    v_inserted int;
    v_completed uuid[] := '{}';
    v_id uuid;
    v_ids uuid[];  -- the jobs left to the general evaluation
    v_out jsonb;
    v_alerts int;
    v_offline int := 0;
    v_recovery int := 0;
    v_try int := 0;
    v_raced uuid[];  -- completed by a batch that committed while this one inserted
    v_gone int;
    v_late int := 0;
begin
    if coalesce(cardinality(p_sequence_numbers), 0) <> v_n
       or coalesce(cardinality(p_statuses), 0) <> v_n
       or coalesce(cardinality(p_rtt_ms), 0) <> v_n
       or coalesce(cardinality(p_jitter_ms), 0) <> v_n
       or coalesce(cardinality(p_recorded_at), 0) <> v_n then
        raise exception 'p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms and p_recorded_at must each have as many elements as p_job_ids (%)', v_n
            using errcode = '22023';
    end if;
    if p_settle_s is null or p_settle_s < 0 then
        raise exception 'p_settle_s must be 0 or more (got %)', p_settle_s using errcode = '22023';
    end if;

    -- One statement: insert, move last_ping_at, and evaluate the common case in place: a
    -- job whose samples inserted by this batch extend its cursor without a hole and are of
    -- one kind (successes, or misses; system errors among them), so the run just grows.
    -- The cursor, run and state are read from the job row the UPDATE locks (compare-and-
    -- set against the values joined: a concurrent batch that moved them makes this job
    -- fall to the general evaluation below). The rest (mixed kinds, holes, late samples)
    -- is evaluated by soundcheck_evaluate_alerts.
    with ins as (
        insert into samples (id, job_id, sequence_number, status, rtt_ms, jitter_ms,
                             recorded_at)
        select encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                      placing substring(int8send(floor(extract(epoch from u.ts) * 1000)::bigint)
                                        from 3) from 1 for 6), 52, 1), 53, 1), 'hex')::uuid,
               u.job_id, u.seq, u.status::sample_status,
               round(u.rtt::numeric, 2),
               round(u.jitter::numeric, 2), u.ts
        from unnest(p_job_ids, p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms,
                    p_recorded_at) as u(job_id, seq, status, rtt, jitter, ts)
        -- A job deleted while its samples were buffered: drop them, not the batch. A job
        -- an earlier batch completed: its rollups and notice are final, so its late
        -- samples are refused (counted below).
        where exists (select 1 from jobs j where j.id = u.job_id and j.status <> 'completed')
        on conflict (job_id, sequence_number) do nothing
        returning job_id, sequence_number, status, recorded_at
    ),
    blk as (  -- per job: what this batch inserted (a duplicate's writer moved last_ping_at)
        select job_id, count(*) as n, min(sequence_number) as lo, max(sequence_number) as hi,
               count(*) filter (where status = 'success') as ns,
               count(*) filter (where status = 'missed') as nm,
               max(recorded_at) as ts
        from ins group by job_id
    ),
    x as (
        select blk.job_id, blk.ts, j.poller_alert_seq as seq0,
               coalesce(j.poller_alert_run, 0)::int as run0, j.alert_state as state0,
               j.alert_on_offline, j.alert_on_recovery, blk.n, blk.lo, blk.hi,
               (blk.ns + blk.nm)::int as cnt,
               case when blk.ns > 0 then 1 when blk.nm > 0 then -1 else 0 end as kind,
               -- a null cursor starts at this batch (docs/alerts-and-notices.md, "Gaps")
               blk.hi - blk.lo + 1 = blk.n
               and blk.lo = coalesce(j.poller_alert_seq, blk.lo - 1) + 1
               and (blk.ns = 0 or blk.nm = 0) as fast
        from blk join jobs j on j.id = blk.job_id
    ),
    y as (
        select x.*, case when x.kind = 0 then x.run0
                         else x.kind * least(5, x.carry + x.cnt) end as run1,
               x.kind <> 0 and x.carry + x.cnt >= 5
               and (x.kind = -1) = (x.state0 = 'ok') as trans,
               greatest(1, 5 - x.carry) as trans_nth  -- the sample that makes the run 5
        from (select x.*, case when sign(x.run0) = x.kind then abs(x.run0) else 0 end as carry
              from x) x
    ),
    upd as (
        update jobs j
        set last_ping_at = greatest(j.last_ping_at, y.ts),
            -- Each column moves only if the row is still as it was joined in x.
            poller_alert_seq = case when y.fast and (j.poller_alert_seq,
                                        coalesce(j.poller_alert_run, 0), j.alert_state)
                                        is not distinct from (y.seq0, y.run0, y.state0)
                                    then y.hi
                                    -- from before the upgrade: the evaluation below starts
                                    -- at this batch
                                    when j.poller_alert_seq is null then y.lo - 1
                                    else j.poller_alert_seq end,
            poller_alert_run = case when y.fast and (j.poller_alert_seq,
                                        coalesce(j.poller_alert_run, 0), j.alert_state)
                                        is not distinct from (y.seq0, y.run0, y.state0)
                                    then y.run1 else j.poller_alert_run end,
            alert_state = case when y.fast and y.trans and (j.poller_alert_seq,
                                   coalesce(j.poller_alert_run, 0), j.alert_state)
                                   is not distinct from (y.seq0, y.run0, y.state0)
                               then (case when y.kind = 1 then 'ok' else 'offline_alerted'
                                     end)::alert_state
                               else j.alert_state end
        from y
        where j.id = y.job_id
        -- applied: the cursor is now past this batch's samples (no other batch can have
        -- put it there: they were inserted, so unseen, by this one)
        -- j.status is the row's latest version: a completion that committed while this
        -- statement ran shows here (this UPDATE waited for its lock on the row).
        returning j.id, j.status, y.n, y.fast and j.poller_alert_seq = y.hi as applied,
                  y.trans, y.kind, y.trans_nth, y.alert_on_offline, y.alert_on_recovery
    ),
    a as (
        insert into alerts (job_id, alert_type, triggered_at, delivery_status)
        select upd.id, case when upd.kind = 1 then 'recovery' else 'offline' end,
               (select i.recorded_at from ins i
                where i.job_id = upd.id and i.status <> 'system_error'
                order by i.sequence_number offset upd.trans_nth - 1 limit 1), 'pending'
        from upd
        where applied and trans and upd.status <> 'completed'
          and ((kind = -1 and alert_on_offline) or (kind = 1 and alert_on_recovery))
        returning id, job_id, alert_type
    ),
    o as (
        insert into poller_outbox (kind, job_id, alert_id)
        select alert_type, job_id, id from a
        returning 1
    )
    select coalesce(sum(n), 0),
           count(*) filter (where applied and trans and kind = -1 and status <> 'completed'),
           count(*) filter (where applied and trans and kind = 1 and status <> 'completed'),
           coalesce(array_agg(id) filter (where not applied and status <> 'completed'), '{}'),
           (select count(*) from o),
           coalesce(array_agg(id) filter (where status = 'completed'), '{}')
    into v_inserted, v_offline, v_recovery, v_ids, v_alerts, v_raced
    from upd;

    -- Late samples (docs/alerts-and-notices.md, "Late samples"). What this batch inserted for a job completed
    -- meanwhile is taken out again: rows of this transaction only (xmin), so rows that
    -- were there before stay.
    if cardinality(v_raced) > 0 then
        delete from samples s
        where s.job_id = any (v_raced) and s.xmin = pg_current_xact_id()::xid;
        get diagnostics v_gone = row_count;
        v_inserted := v_inserted - v_gone;
    end if;
    -- Counted only when some sample was not inserted (a duplicate, a deleted job's, a late
    -- one), so a batch of new samples pays nothing for it. A duplicate of a row that was
    -- there before completion is not late: the job's figures already hold it.
    if v_inserted < v_n then
        select count(*) into v_late
        from unnest(p_job_ids, p_sequence_numbers) as u(job_id, seq)
        join jobs j on j.id = u.job_id and j.status = 'completed'
        where not exists (select 1 from samples s
                          where s.job_id = u.job_id and s.sequence_number = u.seq);
    end if;

    -- Each call is a new statement, so a retry sees what the batch it waited for wrote.
    while cardinality(v_ids) > 0 loop
        -- last_ping_at was moved above: no sample times to pass
        v_out := soundcheck_evaluate_alerts(v_ids, null, p_settle_s, false);
        v_offline := v_offline + (v_out->>'offline')::int;
        v_recovery := v_recovery + (v_out->>'recovery')::int;
        exit when jsonb_array_length(v_out->'retry') = 0;
        v_try := v_try + 1;
        if v_try > 20 then
            raise exception 'alert evaluation kept racing with other batches'
                using errcode = '40001';
        end if;
        select coalesce(array_agg(x::uuid), '{}') into v_ids
        from jsonb_array_elements_text(v_out->'retry') x;
    end loop;

    for v_id in
        update jobs
        set status = 'completed', completed_at = now()
        where id = any (coalesce(p_complete_job_ids, '{}'))
          and status = 'running'
          and started_at + make_interval(mins => duration_minutes) <= now()
        returning id
    loop
        perform create_job_rollups(v_id);
        v_completed := v_completed || v_id;
        insert into poller_outbox (kind, job_id) values ('completion', v_id)
        on conflict (job_id) where kind = 'completion' do nothing;
    end loop;
    if cardinality(v_completed) > 0 then
        -- The job is over: what still waited behind a hole is evaluated now. Its row is
        -- locked by the update above, so no other batch can move its cursor meanwhile.
        v_out := soundcheck_evaluate_alerts(v_completed, null, p_settle_s, true);
        v_offline := v_offline + (v_out->>'offline')::int;
        v_recovery := v_recovery + (v_out->>'recovery')::int;
    end if;

    return jsonb_build_object('inserted', v_inserted, 'completed', to_jsonb(v_completed),
                              'offline', v_offline, 'recovery', v_recovery, 'late', v_late);
end
$$;

-- API version 1's batch, for pollers of earlier releases (they raise no alerts): insert
-- the samples (duplicates absorbed), move last_ping_at, complete the expired jobs asked
-- for and build their rollups. The completing UPDATE takes
-- the row lock and re-checks status = 'running', so of two replicas racing exactly one
-- completes a job and builds its rollups.
create or replace function poller_record_batch(
    p_job_ids uuid[],
    p_sequence_numbers int[],
    p_statuses text[],
    p_rtt_ms float8[],
    p_jitter_ms float8[],
    p_recorded_at timestamptz[],
    p_complete_job_ids uuid[] default '{}')
returns jsonb
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_n int := coalesce(cardinality(p_job_ids), 0);
    v_inserted int;
    v_completed uuid[] := '{}';
    v_id uuid;
begin
    if coalesce(cardinality(p_sequence_numbers), 0) <> v_n
       or coalesce(cardinality(p_statuses), 0) <> v_n
       or coalesce(cardinality(p_rtt_ms), 0) <> v_n
       or coalesce(cardinality(p_jitter_ms), 0) <> v_n
       or coalesce(cardinality(p_recorded_at), 0) <> v_n then
        raise exception 'p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms and p_recorded_at must each have as many elements as p_job_ids (%)', v_n
            using errcode = '22023';
    end if;

    insert into samples (job_id, sequence_number, status, rtt_ms, jitter_ms, recorded_at)
    select u.job_id, u.seq, u.status::sample_status, round(u.rtt::numeric, 2),
           round(u.jitter::numeric, 2), u.ts
    from unnest(p_job_ids, p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms, p_recorded_at)
         as u(job_id, seq, status, rtt, jitter, ts)
    -- A job deleted while its samples were buffered: drop them rather than fail the batch.
    where exists (select 1 from jobs j where j.id = u.job_id)
    on conflict (job_id, sequence_number) do nothing;
    get diagnostics v_inserted = row_count;

    update jobs j
    set last_ping_at = m.ts
    from (select u.job_id, max(u.ts) as ts
          from unnest(p_job_ids, p_recorded_at) as u(job_id, ts)
          group by u.job_id
          order by u.job_id) as m
    where j.id = m.job_id and (j.last_ping_at is null or j.last_ping_at < m.ts);

    for v_id in
        update jobs
        set status = 'completed', completed_at = now()
        where id = any (coalesce(p_complete_job_ids, '{}'))
          and status = 'running'
          and started_at + make_interval(mins => duration_minutes) <= now()
        returning id
    loop
        perform create_job_rollups(v_id);
        v_completed := v_completed || v_id;
    end loop;

    return jsonb_build_object('inserted', v_inserted, 'completed', to_jsonb(v_completed));
end
$$;
