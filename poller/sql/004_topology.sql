-- Fleet topology and heartbeats, so a fleet changes size without gaps (their functions:
-- repeatable/30_fleet.sql).
set local lock_timeout = '5s';

create table if not exists poller_topology (
    fleet      text primary key,
    counts     int[] not null check (cardinality(counts) between 1 and 2),
    epoch      bigint not null default 1,
    updated_at timestamptz not null default now()
);

create table if not exists poller_heartbeats (
    fleet      text not null,
    replica_id int not null,
    counts     int[] not null,
    epoch      bigint not null,
    owned_jobs int not null,
    version    text not null,
    seen_at    timestamptz not null default now(),
    primary key (fleet, replica_id)
);

-- No policies: only roles that bypass row level security (service role, postgres) see them.
alter table poller_topology enable row level security;
alter table poller_heartbeats enable row level security;

insert into soundcheck_migrations (version, name)
values (4, '004_topology') on conflict (version) do nothing;
