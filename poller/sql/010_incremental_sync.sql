-- Syncs that cost what changed: each change of a job that matters to a poller, with the
-- id of the transaction that made it, recorded by triggers on jobs (repeatable/20_sync.sql
-- has them, their function and the reading of the changes). A sync with nothing changed
-- returns no job and costs one index probe.
set local lock_timeout = '5s';

create table if not exists poller_job_changes (
    xid    xid8 not null,
    job_id uuid not null,
    bucket int not null,
    at     timestamptz not null default now()
);
create index if not exists poller_job_changes_xid on poller_job_changes (xid);
create index if not exists poller_job_changes_at on poller_job_changes (at);
alter table poller_job_changes enable row level security;

insert into soundcheck_migrations (version, name)
values (10, '010_incremental_sync') on conflict (version) do nothing;
