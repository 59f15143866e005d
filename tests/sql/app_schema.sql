-- The Sound Check app's own schema as it stands before the poller's migrations: created by
-- the app, not by us. Differences the migrations must respect: extra columns, its own
-- create_job_rollups and sample_rollups shape, no unique key on samples, Supabase roles.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then
        create role anon nologin;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then
        create role service_role nologin bypassrls;
    end if;
end
$$;

create type job_status as enum ('running', 'completed', 'cancelled', 'failed');
create type sample_status as enum ('success', 'missed', 'system_error');
create type alert_state as enum ('ok', 'offline_alerted');
create type job_reason as enum ('reactive', 'proactive');

create table jobs (
    id uuid primary key default gen_random_uuid(),
    account_number text not null,
    target_mac text,
    target_ip text,
    reason job_reason not null,
    notification_email text not null,
    requester_id uuid not null,
    requester_name text not null,
    source text not null,
    cadence_seconds int not null default 60,
    duration_minutes int not null default 60,
    status job_status not null default 'running',
    monitoring_mode text not null default 'simulated',
    alert_on_offline bool not null default true,
    alert_on_recovery bool not null default true,
    alert_state alert_state not null default 'ok',
    started_at timestamptz not null default now(),
    completed_at timestamptz,
    last_ping_at timestamptz,
    created_at timestamptz not null default now(),
    ticket_ref text,                        -- a column the poller knows nothing about
    constraint jobs_target_check check (target_mac is not null or target_ip is not null)
);

create table samples (
    id uuid primary key default gen_random_uuid(),
    job_id uuid not null references jobs (id) on delete cascade,
    sequence_number int not null,
    status sample_status not null,
    rtt_ms numeric(10, 2),
    jitter_ms numeric(10, 2),
    recorded_at timestamptz not null default now()
);

create table sample_rollups (
    id bigserial primary key,
    job_id uuid not null references jobs (id) on delete cascade,
    bucket_start timestamptz not null,
    samples int not null,
    uptime_pct numeric(5, 2)
);

create function create_job_rollups(p_job_id uuid, p_bucket_minutes int default 5)
returns void language sql as $$
    insert into sample_rollups (job_id, bucket_start, samples, uptime_pct)
    select p_job_id, date_trunc('hour', recorded_at), count(*),
           round(100.0 * count(*) filter (where status = 'success') / count(*), 2)
    from samples where job_id = p_job_id group by 2
$$;

create table alerts (
    id uuid primary key default gen_random_uuid(),
    job_id uuid not null references jobs (id) on delete cascade,
    alert_type text not null,
    triggered_at timestamptz not null default now(),
    delivered_at timestamptz,
    delivery_status text
);

alter table jobs enable row level security;
alter table samples enable row level security;

alter default privileges in schema public grant execute on functions to anon, authenticated;

insert into jobs (id, account_number, target_ip, reason, notification_email, requester_id,
                  requester_name, source, status, monitoring_mode, ticket_ref)
values ('11111111-1111-1111-1111-111111111111', 'ACC-9', '192.0.2.10', 'reactive',
        'a@example.com', gen_random_uuid(), 'Ann', 'web', 'completed', 'real_polling', 'T-1');
insert into samples (job_id, sequence_number, status, rtt_ms)
values ('11111111-1111-1111-1111-111111111111', 1, 'success', 12.5),
       ('11111111-1111-1111-1111-111111111111', 2, 'missed', null);
