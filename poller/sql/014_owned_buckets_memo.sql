-- The buckets each replica pings, kept instead of computed at every fleet sync (a jump
-- hash and a rendezvous per bucket: 15 ms of a core per sync whatever the job count; a
-- fleet of 20 replicas syncing every 5 s kept 6 % of a database core busy on answers that
-- change only when the topology or the live set does). soundcheck_owned_buckets_live
-- (repeatable/10_partition.sql) reads and fills it.
set local lock_timeout = '5s';

-- Answers of soundcheck_owned_buckets_live: a pure function of its key, so never stale.
-- Rows unused for a week are dropped by the next miss.
create table if not exists poller_owned_buckets (
    replica_id int not null,
    counts     int[] not null,
    live       int[] not null,  -- sorted, without duplicates
    buckets    int[] not null,
    used_at    timestamptz not null default now(),
    primary key (replica_id, counts, live)
);
alter table poller_owned_buckets enable row level security;

insert into soundcheck_migrations (version, name)
values (14, '014_owned_buckets_memo') on conflict (version) do nothing;
