-- SQL API version 6: offline/recovery alerts and completion notices, decided in the
-- transaction that writes the samples, where the order of a job's samples is known.
--
-- The app's rules (docs/alerts-and-notices.md, "Alerts and completion notices"): a job whose last 5 samples are
-- all `missed` while alert_state = 'ok' goes offline (alert_state 'offline_alerted', an
-- `alerts` row 'offline' if alert_on_offline); one that is offline and whose last 5 are all
-- `success` recovers ('ok', an alert 'recovery' if alert_on_recovery). `system_error`
-- samples are the poller's, not the target's: they neither trigger nor break a run.
--
-- Exactly once, whatever replica writes which sample in whatever order: each job carries a
-- cursor (poller_alert_seq, the last sequence number evaluated, and poller_alert_run, the
-- run carried over: +n successes or -n misses in a row, n capped at 5). A batch evaluates,
-- in sequence order, only the samples that extend the cursor without a hole; a hole (a
-- slot with no sample yet) holds the evaluation until it is filled or older than the
-- settle time (then it counts as a gap: neither triggers nor breaks). The cursor is moved
-- by compare-and-set, so two batches racing on one job evaluate it one after the other.
--
-- Every alert and every completed job also gets a row in poller_outbox, which any replica
-- with a delivery channel claims (FOR UPDATE SKIP LOCKED) and delivers.
--
-- Jobs created from here on start with the cursor at -1 (evaluated from slot 0). Jobs that
-- were already running keep a null cursor and are evaluated from the first batch written
-- after the upgrade: their history raises no alert for runs long over.
--
-- Additive: two nullable columns on jobs (added only where missing: ALTER TABLE takes an
-- ACCESS EXCLUSIVE lock even when the column exists; the default applies to new rows only,
-- no row is rewritten), new tables and functions; poller_record_batch stays for pollers of
-- earlier releases (they raise no alerts).
set local lock_timeout = '5s';

do $$ begin
    if not exists (select 1 from pg_attribute
                   where attrelid = 'jobs'::regclass and attname = 'poller_alert_seq'
                     and not attisdropped) then
        alter table jobs add column poller_alert_seq int, add column poller_alert_run smallint;
        alter table jobs alter column poller_alert_seq set default -1;
    end if;
end $$;

create table if not exists poller_outbox (
    id              bigint generated always as identity primary key,
    kind            text not null check (kind in ('offline', 'recovery', 'completion')),
    job_id          uuid not null references jobs (id) on delete cascade,
    alert_id        uuid references alerts (id) on delete cascade,
    created_at      timestamptz not null default now(),
    status          text not null default 'pending' check (status in ('pending', 'sent', 'failed')),
    attempts        int not null default 0,
    next_attempt_at timestamptz not null default now(),
    claimed_by      text,
    claimed_until   timestamptz,
    done_channels   text[] not null default '{}',
    last_error      text,
    sent_at         timestamptz
);
-- One completion notice per job, one notice per alert.
create unique index if not exists poller_outbox_completion_key
    on poller_outbox (job_id) where kind = 'completion';
create unique index if not exists poller_outbox_alert_key
    on poller_outbox (alert_id) where alert_id is not null;
create index if not exists poller_outbox_due
    on poller_outbox (next_attempt_at) where status = 'pending';
-- Finished notices by when they finished: the failed count and the clean-up.
create index if not exists poller_outbox_finished
    on poller_outbox (next_attempt_at) where status <> 'pending';

-- Evaluate the alert rules for the jobs p_job_ids (the jobs of a batch; p_last_ping their
-- newest sample times, for last_ping_at), moving each job's cursor by compare-and-set.
-- p_final: the job is over, so every hole is a gap. Returns the jobs to evaluate again (a
-- concurrent batch moved their cursor first) and the transitions made.
create or replace function soundcheck_evaluate_alerts(p_job_ids uuid[], p_last_ping timestamptz[],
                                                      p_settle_s int, p_final bool)
returns jsonb
language sql
set search_path = public, pg_temp
as $$
    with b as (
        select u.job_id, max(u.ts) as ts
        from unnest(p_job_ids, p_last_ping) as u(job_id, ts)
        group by u.job_id
    ),
    c as (
        select j.id, j.alert_state as state0, j.poller_alert_seq as seq0,
               coalesce(j.poller_alert_run, 0)::int as run0, b.ts, j.last_ping_at,
               j.alert_on_offline, j.alert_on_recovery,
               -- slots up to here waited long enough: a hole there is a gap
               case when p_final then 2147483647
                    else floor(extract(epoch from now() - j.started_at
                                       - make_interval(secs => p_settle_s))
                               / j.cadence_seconds)::int
               end as expired
        from b join jobs j on j.id = b.job_id
        -- (a null cursor: a job from before the upgrade that no batch has reached yet)
        where j.cadence_seconds >= 1 and j.poller_alert_seq is not null
    ),
    s as (  -- the samples past the cursor; settled: no hole before them but gaps
        select c.id, x.sequence_number as seq, x.status, x.recorded_at,
               x.sequence_number <= c.expired
               or x.sequence_number - greatest(c.expired, coalesce(c.seq0, -1))
                  = row_number() over (partition by c.id, x.sequence_number > c.expired
                                       order by x.sequence_number) as settled
        from c join samples x on x.job_id = c.id and x.sequence_number > coalesce(c.seq0, -1)
    ),
    e as (  -- settled successes and misses in order; grp numbers the runs of one kind
        select s.id, s.seq, s.recorded_at, case s.status when 'success' then 1 else -1 end as kind,
               row_number() over (partition by s.id order by s.seq)
               - row_number() over (partition by s.id, s.status order by s.seq) as grp
        from s where s.settled and s.status <> 'system_error'
    ),
    r as (  -- the length of the run at each sample; the first run continues the carried one
        select e.id, e.seq, e.recorded_at, e.kind,
               (e.kind = -1 and c.alert_on_offline) or (e.kind = 1 and c.alert_on_recovery)
               as wanted,
               row_number() over (partition by e.id, e.kind, e.grp order by e.seq) as rn,
               row_number() over (partition by e.id, e.kind, e.grp order by e.seq)
               + case when e.grp = 0 and sign(c.run0) = e.kind then abs(c.run0) else 0 end as len
        from e join c on c.id = e.id
    ),
    k as (  -- where a run reaches 5, and the state before the batch as a starting point
        select r.id, r.seq, r.recorded_at, r.kind, r.wanted
        from r where r.len >= 5 and (r.len = 5 or r.rn = 1)
        union all
        select c.id, -2, null, case when c.state0 = 'ok' then 1 else -1 end, false from c
    ),
    tr as (  -- transitions: a run of the kind opposite to the state (-1 offline, 1 recovery)
        select id, seq, recorded_at, kind, wanted
        from (select k.*, k.kind <> lag(k.kind) over (partition by k.id order by k.seq) as flip
              from k) x
        where flip
    ),
    fin as (
        select c.*, coalesce(m.seq1, c.seq0) as seq1, coalesce(lr.run1, c.run0) as run1,
               coalesce(lt.state1, c.state0) as state1
        from c
        left join (select id, max(seq) as seq1 from s where settled group by id) m on m.id = c.id
        left join (select distinct on (id) id, kind * least(5, len)::int as run1
                   from r order by id, seq desc) lr on lr.id = c.id
        left join (select distinct on (id) id,
                          (case when kind = 1 then 'ok' else 'offline_alerted' end)::alert_state
                          as state1
                   from tr order by id, seq desc) lt on lt.id = c.id
    ),
    need as (
        select * from fin
        where fin.ts > coalesce(fin.last_ping_at, '-infinity')
           or fin.seq1 is distinct from fin.seq0 or fin.run1 <> fin.run0
           or fin.state1 <> fin.state0
    ),
    u as (
        update jobs j
        set last_ping_at = greatest(j.last_ping_at, n.ts),
            poller_alert_seq = n.seq1, poller_alert_run = n.run1, alert_state = n.state1
        from need n
        where j.id = n.id
          and j.poller_alert_seq is not distinct from n.seq0
          and coalesce(j.poller_alert_run, 0) = n.run0 and j.alert_state = n.state0
        returning j.id
    ),
    a as (
        insert into alerts (job_id, alert_type, triggered_at, delivery_status)
        select tr.id, case when tr.kind = 1 then 'recovery' else 'offline' end,
               tr.recorded_at, 'pending'
        from tr
        where tr.wanted and tr.id in (select id from u)
        returning id, job_id, alert_type
    ),
    o as (
        insert into poller_outbox (kind, job_id, alert_id)
        select a.alert_type, a.job_id, a.id from a
        returning 1
    )
    select jsonb_build_object(
        'retry', coalesce((select jsonb_agg(n.id) from need n
                           where not exists (select 1 from u where u.id = n.id)), '[]'),
        'offline', (select count(*) from tr where tr.kind = -1 and tr.id in (select id from u)),
        'recovery', (select count(*) from tr where tr.kind = 1 and tr.id in (select id from u)),
        'alerts', (select count(*) from o))
$$;

-- poller_record_batch with alerts and completion notices. p_settle_s: how long a hole in a
-- job's samples may wait for a late sample before it counts as a gap.
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
        insert into samples (job_id, sequence_number, status, rtt_ms, jitter_ms, recorded_at)
        select u.job_id, u.seq, u.status::sample_status, round(u.rtt::numeric, 2),
               round(u.jitter::numeric, 2), u.ts
        from unnest(p_job_ids, p_sequence_numbers, p_statuses, p_rtt_ms, p_jitter_ms,
                    p_recorded_at) as u(job_id, seq, status, rtt, jitter, ts)
        -- A job deleted while its samples were buffered: drop them, not the batch.
        where exists (select 1 from jobs j where j.id = u.job_id)
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
        returning j.id, y.n, y.fast and j.poller_alert_seq = y.hi as applied,
                  y.trans, y.kind, y.trans_nth, y.alert_on_offline, y.alert_on_recovery
    ),
    a as (
        insert into alerts (job_id, alert_type, triggered_at, delivery_status)
        select upd.id, case when upd.kind = 1 then 'recovery' else 'offline' end,
               (select i.recorded_at from ins i
                where i.job_id = upd.id and i.status <> 'system_error'
                order by i.sequence_number offset upd.trans_nth - 1 limit 1), 'pending'
        from upd
        where applied and trans
          and ((kind = -1 and alert_on_offline) or (kind = 1 and alert_on_recovery))
        returning id, job_id, alert_type
    ),
    o as (
        insert into poller_outbox (kind, job_id, alert_id)
        select alert_type, job_id, id from a
        returning 1
    )
    select coalesce(sum(n), 0), count(*) filter (where applied and trans and kind = -1),
           count(*) filter (where applied and trans and kind = 1),
           coalesce(array_agg(id) filter (where not applied), '{}'), (select count(*) from o)
    into v_inserted, v_offline, v_recovery, v_ids, v_alerts
    from upd;

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
                              'offline', v_offline, 'recovery', v_recovery);
end
$$;

-- The completion summary of a job, as the app's email shows it (the verdict is computed
-- from it in poller/notices/summary.py): sample counts, RTT figures over the successes
-- (p95 by nearest rank), and the runs of misses (system errors and gaps do not break one).
create or replace function soundcheck_job_summary(p_job_id uuid)
returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
    with s as (
        select sequence_number, status, rtt_ms from samples where job_id = p_job_id
    ),
    runs as (
        select status, count(*) as len
        from (select status,
                     row_number() over (order by sequence_number)
                     - row_number() over (partition by status order by sequence_number) as grp
              from s where status <> 'system_error') x
        group by status, grp
    )
    select jsonb_build_object(
        'total', count(*),
        'success', count(*) filter (where status = 'success'),
        'missed', count(*) filter (where status = 'missed'),
        'system_error', count(*) filter (where status = 'system_error'),
        'avg_rtt_ms', round(avg(rtt_ms) filter (where status = 'success'), 2),
        'max_rtt_ms', max(rtt_ms) filter (where status = 'success'),
        'p95_rtt_ms', percentile_disc(0.95) within group (order by rtt_ms)
                      filter (where status = 'success' and rtt_ms is not null),
        'outages', (select count(*) from runs where status = 'missed' and len >= 5),
        'longest_miss_streak', coalesce((select max(len) from runs where status = 'missed'), 0))
    from s
$$;

-- Claim up to p_limit due notices for p_lease_s seconds (a claim that lapses, because its
-- holder died, is claimed again). Each comes with what a message needs. Notices finished
-- over 7 days ago are removed on the way (a few hundred per call at most).
create or replace function poller_claim_notices(p_claimer text, p_limit int, p_lease_s int)
returns jsonb
language sql
set search_path = public, pg_temp
as $$
    with old as (
        delete from poller_outbox
        where id in (select id from poller_outbox
                     where status <> 'pending' and next_attempt_at < now() - interval '7 days'
                     order by next_attempt_at limit 200 for update skip locked)
    ),
    due as (
        select id from poller_outbox
        where status = 'pending' and next_attempt_at <= now()
          and (claimed_until is null or claimed_until < now())
        order by next_attempt_at, id
        limit greatest(0, p_limit)
        for update skip locked
    ),
    claimed as (
        update poller_outbox o
        set claimed_by = p_claimer, claimed_until = now() + make_interval(secs => p_lease_s),
            attempts = o.attempts + 1
        from due where o.id = due.id
        returning o.*
    )
    select jsonb_build_object(
        'notices', coalesce(jsonb_agg(jsonb_build_object(
            'id', c.id, 'kind', c.kind, 'attempts', c.attempts,
            'done_channels', to_jsonb(c.done_channels),
            'alert_id', c.alert_id, 'triggered_at', a.triggered_at,
            'job', jsonb_build_object(
                'id', j.id, 'account_number', j.account_number, 'target_ip', j.target_ip,
                'target_mac', j.target_mac, 'notification_email', j.notification_email,
                'requester_name', j.requester_name, 'cadence_seconds', j.cadence_seconds,
                'duration_minutes', j.duration_minutes, 'started_at', j.started_at,
                'completed_at', j.completed_at, 'status', j.status),
            'summary', case when c.kind = 'completion' then soundcheck_job_summary(j.id) end)
            order by c.id), '[]'),
        'pending', (select count(*) from poller_outbox where status = 'pending'))
    from claimed c
    join jobs j on j.id = c.job_id
    left join alerts a on a.id = c.alert_id
$$;

-- The outcome of one delivery attempt by the claim's holder: p_done the channels that
-- took the notice (kept, so a retry sends only to the others), p_error what failed (null:
-- delivered). After p_max_attempts attempts a notice is 'failed'. The alert row mirrors
-- the outcome. Returns the notice's status, or null when the claim had lapsed.
create or replace function poller_finish_notice(p_id bigint, p_claimer text, p_done text[],
                                                p_error text, p_retry_s float8,
                                                p_max_attempts int)
returns text
language sql
set search_path = public, pg_temp
as $$
    with f as (
        update poller_outbox
        set done_channels = array(select distinct x from unnest(done_channels || p_done) x
                                  order by x),
            status = case when p_error is null then 'sent'
                          when attempts >= p_max_attempts then 'failed'
                          else 'pending' end,
            sent_at = case when p_error is null then now() end,
            last_error = left(p_error, 500),
            next_attempt_at = now() + make_interval(secs => greatest(0, p_retry_s)),
            claimed_by = null, claimed_until = null
        where id = p_id and claimed_by = p_claimer and status = 'pending'
        returning alert_id, status, sent_at
    ),
    a as (
        update alerts a
        set delivery_status = f.status, delivered_at = f.sent_at
        from f where a.id = f.alert_id and f.status <> 'pending'
        returning 1
    )
    select f.status from f
$$;

-- What the operator reports: notices waiting (and for how long), and those that failed
-- for good in the last 24 hours. Database-wide: every fleet on the database shares it.
create or replace function poller_outbox_state()
returns jsonb
language sql stable
set search_path = public, pg_temp
as $$
    select jsonb_build_object(
        'pending', (select count(*) from poller_outbox where status = 'pending'),
        'oldest_pending_s', coalesce((select extract(epoch from now() - min(created_at))
                                      from poller_outbox where status = 'pending'), 0),
        'failed_24h', (select count(*) from poller_outbox
                       where status = 'failed' and next_attempt_at > now() - interval '1 day'))
$$;

do $$ begin
    if to_regprocedure('poller_api_version()') is null or poller_api_version() < 6 then
        create or replace function poller_api_version() returns int language sql immutable
            set search_path = public, pg_temp as 'select 6';
    end if;
end $$;

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (9, '009_notices') on conflict (version) do nothing;
