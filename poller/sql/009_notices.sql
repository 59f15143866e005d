-- Offline/recovery alerts and completion notices (the rules: repeatable/40_alerts.sql).
-- Each job carries its alert cursor (poller_alert_seq, the last sequence number evaluated,
-- and poller_alert_run, the run carried over); every alert and every completed job gets a
-- row in poller_outbox, which any replica with a delivery channel claims and delivers.
--
-- Two nullable columns on jobs, added only where missing: ALTER TABLE takes an ACCESS
-- EXCLUSIVE lock even when the column exists. The default (-1: evaluated from slot 0)
-- applies to new rows only, no row is rewritten: jobs already running keep a null cursor,
-- evaluated from the first batch written after this migration, so their history raises no
-- alert for runs long over.
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
-- No policies: only roles that bypass row level security (service role, postgres) see it.
alter table poller_outbox enable row level security;

insert into soundcheck_migrations (version, name)
values (9, '009_notices') on conflict (version) do nothing;
