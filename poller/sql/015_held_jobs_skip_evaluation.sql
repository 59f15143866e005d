-- A job held behind a hole is not evaluated again until the hole can move. A slot with no
-- sample yet (a poller restarted, a replica taken over, a job first seen after its start)
-- holds the job's alert evaluation until it is filled or settled (docs/alerts-and-notices.md, "Gaps"). Until
-- then every batch with a sample of that job fell to the general evaluation, which reads
-- all of the job's samples past the cursor to find that nothing can move: per batch, work
-- that grows with each sample held. After a poller restarts or a replica is taken over,
-- that is every job of it for the settle time (60 s by default). Such a job is now passed
-- over at the cost of one index probe: the slot after its cursor has no sample and is not
-- yet settled, so no sample of it can be evaluated. `python bench/bench_alerts.py
-- --held 2` (5,000 jobs held for 30 rounds): the write with alerts cost 2.03 times the
-- write without, and more each round; now 1.27. Same arguments and answers (API
-- version 7).
set local lock_timeout = '5s';

-- 009's evaluation keeps its body under a new name; the old name filters, then calls it.
-- (Renamed once: where it already was, 009's function is not renamed again.)
do $$ begin
    if to_regprocedure('soundcheck_evaluate_alerts_all(uuid[], timestamptz[], int, bool)')
       is null then
        alter function soundcheck_evaluate_alerts(uuid[], timestamptz[], int, bool)
            rename to soundcheck_evaluate_alerts_all;
    end if;
end $$;

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

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (15, '015_held_jobs_skip_evaluation') on conflict (version) do nothing;
