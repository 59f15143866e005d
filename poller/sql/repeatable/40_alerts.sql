-- Offline/recovery alerts, decided in the transaction that writes the samples, where the
-- order of a job's samples is known.
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
-- A job starts with the cursor at -1 (the column's default, migration 009): evaluated from
-- slot 0. Jobs that were running when 009 was applied kept a null cursor and were
-- evaluated from the first batch written after it: their history raised no alert for
-- runs long over.
insert into soundcheck_repeatables (name, revision) values ('40_alerts', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';

-- Evaluate the alert rules for the jobs p_job_ids (the jobs of a batch; p_last_ping their
-- newest sample times, for last_ping_at), moving each job's cursor by compare-and-set.
-- p_final: the job is over, so every hole is a gap. Returns the jobs to evaluate again (a
-- concurrent batch moved their cursor first) and the transitions made.
create or replace function soundcheck_evaluate_alerts_all(p_job_ids uuid[], p_last_ping timestamptz[],
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

-- The evaluation the batches call. A job held behind a hole (the slot after its cursor has
-- no sample yet: a poller restarted, a replica taken over, a job first seen after its
-- start) is passed over at the cost of one index probe until the hole is filled or
-- settled (docs/alerts-and-notices.md, "Gaps"); the others go to the general evaluation
-- above. Without this, every batch of a held job read all its samples past the cursor to
-- find that nothing could move: after a restart or a takeover, every job of the replica
-- for the settle time. `python bench/bench_alerts.py --held 2` (5,000 jobs held for 30
-- rounds): the write with alerts cost 2.03 times the write without, and more each round;
-- with this, 1.27.
create or replace function soundcheck_evaluate_alerts(p_job_ids uuid[], p_last_ping timestamptz[],
                                                      p_settle_s int, p_final bool)
returns jsonb
language sql
set search_path = public, pg_temp
as $$
    -- Kept: the jobs that may move. Passed over: a job with a cursor, no ping time to
    -- record (p_last_ping), not final, whose next slot is unsettled and has no sample.
    -- (The same settle rule as soundcheck_evaluate_alerts_all's `expired`.)
    with kept as (
        select u.job_id, u.ts, u.n
        from unnest(p_job_ids, p_last_ping) with ordinality as u(job_id, ts, n)
        left join jobs j on j.id = u.job_id
        where p_final or u.ts is not null or j.id is null or j.cadence_seconds < 1
           or j.poller_alert_seq is null
           or j.poller_alert_seq + 1 <= floor(extract(epoch from now() - j.started_at
                                                       - make_interval(secs => p_settle_s))
                                               / j.cadence_seconds)::int
           -- A scalar subquery: an index probe per job, where an EXISTS may be planned as
           -- one scan of every sample, hashed.
           or (select true from samples x
               where x.job_id = j.id and x.sequence_number = j.poller_alert_seq + 1)
    )
    select soundcheck_evaluate_alerts_all(
        array(select job_id from kept order by n),
        array(select ts from kept order by n),
        p_settle_s, p_final)
$$;
