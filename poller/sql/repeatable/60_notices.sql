-- Completion summaries and the outbox of notices: claimed by any replica with a delivery
-- channel (FOR UPDATE SKIP LOCKED), delivered, finished.
insert into soundcheck_repeatables (name, revision) values ('60_notices', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';


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
