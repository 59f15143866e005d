-- Sound Check base schema, created only where absent.
--
-- On the Sound Check Supabase project these objects already exist (created by the app) and
-- every statement below is a no-op. On an empty database (local runs, tests, the demo) it
-- creates the same shape the poller works against: enum types, the app's NOT NULL columns,
-- the target check and row level security. Nothing here drops or rewrites data.

-- Waiting for a lock behind the app's long transactions would block the app's queries
-- queued behind us: give up instead (run it again later).
set local lock_timeout = '5s';

create table if not exists soundcheck_migrations (
    version    int primary key,
    name       text not null,
    applied_at timestamptz not null default now()
);

do $$
begin
    if to_regtype('job_status') is null then
        create type job_status as enum ('running', 'completed', 'cancelled', 'failed');
    end if;
    if to_regtype('sample_status') is null then
        create type sample_status as enum ('success', 'missed', 'system_error');
    end if;
    if to_regtype('alert_state') is null then
        create type alert_state as enum ('ok', 'offline_alerted');
    end if;
    if to_regtype('job_reason') is null then
        create type job_reason as enum ('reactive', 'proactive');
    end if;
end
$$;

create table if not exists jobs (
    id                 uuid primary key default gen_random_uuid(),
    account_number     text not null,
    target_mac         text,
    target_ip          text,
    reason             job_reason not null,
    notification_email text not null,
    requester_id       uuid not null,
    requester_name     text not null,
    source             text not null default 'web',
    cadence_seconds    int not null default 60,
    duration_minutes   int not null default 60,
    status             job_status not null default 'running',
    monitoring_mode    text not null default 'simulated'
                       check (monitoring_mode in ('simulated', 'real_polling')),
    alert_on_offline   bool not null default true,
    alert_on_recovery  bool not null default true,
    alert_state        alert_state not null default 'ok',
    started_at         timestamptz not null default now(),
    completed_at       timestamptz,
    last_ping_at       timestamptz,
    created_at         timestamptz not null default now(),
    constraint jobs_target_present check (target_mac is not null or target_ip is not null)
);

create table if not exists samples (
    id              uuid primary key default gen_random_uuid(),
    job_id          uuid not null references jobs (id) on delete cascade,
    sequence_number int not null,
    status          sample_status not null,
    rtt_ms          numeric(10, 2),
    jitter_ms       numeric(10, 2),
    recorded_at     timestamptz not null default now()
);

create table if not exists sample_rollups (
    id                 uuid primary key default gen_random_uuid(),
    job_id             uuid not null references jobs (id) on delete cascade,
    bucket_start       timestamptz not null,
    bucket_minutes     int not null,
    sample_count       int not null,
    success_count      int not null,
    missed_count       int not null,
    system_error_count int not null,
    avg_rtt_ms         numeric(10, 2),
    min_rtt_ms         numeric(10, 2),
    max_rtt_ms         numeric(10, 2),
    avg_jitter_ms      numeric(10, 2),
    created_at         timestamptz not null default now(),
    unique (job_id, bucket_start, bucket_minutes)
);

create table if not exists alerts (
    id              uuid primary key default gen_random_uuid(),
    job_id          uuid not null references jobs (id) on delete cascade,
    alert_type      text not null,
    triggered_at    timestamptz not null default now(),
    delivered_at    timestamptz,
    delivery_status text
);

-- Only where it is off: ALTER TABLE takes an ACCESS EXCLUSIVE lock even when row level
-- security is already on, which on the app's live database would queue behind any long
-- transaction and block every reader behind it.
do $$
declare
    v_table regclass;
begin
    foreach v_table in array array['jobs', 'samples', 'sample_rollups', 'alerts',
                                   'soundcheck_migrations']::regclass[] loop
        if not (select relrowsecurity from pg_class where oid = v_table) then
            execute format('alter table %s enable row level security', v_table);
        end if;
    end loop;
end
$$;

-- Created only when the app has not defined it: the app's own version wins.
do $$
begin
    if to_regprocedure('create_job_rollups(uuid, integer)') is null then
        create function create_job_rollups(p_job_id uuid, p_bucket_minutes int default 5)
        returns int
        language plpgsql
        set search_path = public, pg_temp
        as $fn$
        declare
            v_count int;
        begin
            -- Rebuilding from scratch keeps the function idempotent.
            delete from sample_rollups
            where job_id = p_job_id and bucket_minutes = p_bucket_minutes;
            insert into sample_rollups (
                job_id, bucket_start, bucket_minutes, sample_count, success_count,
                missed_count, system_error_count, avg_rtt_ms, min_rtt_ms, max_rtt_ms,
                avg_jitter_ms)
            select p_job_id,
                   to_timestamp(floor(extract(epoch from recorded_at)
                                      / (p_bucket_minutes * 60)) * p_bucket_minutes * 60),
                   p_bucket_minutes,
                   count(*),
                   count(*) filter (where status = 'success'),
                   count(*) filter (where status = 'missed'),
                   count(*) filter (where status = 'system_error'),
                   round(avg(rtt_ms), 2), min(rtt_ms), max(rtt_ms),
                   round(avg(jitter_ms), 2)
            from samples
            where job_id = p_job_id
            group by 2;
            get diagnostics v_count = row_count;
            return v_count;
        end
        $fn$;
        -- Marks it as ours, so 006_lock_down.sql restricts it like the poller's functions.
        comment on function create_job_rollups(uuid, integer) is 'soundcheck-poller';
    end if;
end
$$;

insert into soundcheck_migrations (version, name)
values (1, '001_soundcheck_base') on conflict (version) do nothing;
