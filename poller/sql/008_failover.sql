-- Failover (docs/architecture.md, "Failover"): a bucket whose primary replica is not live
-- (leaving, or silent longer than the fleet's failover timeout) is pinged by the live
-- replica that wins the rendezvous hash of bucket and replica. Heartbeats record what a
-- replica has applied and whether it is leaving; each fleet has its failover timeout.
set local lock_timeout = '5s';

alter table poller_heartbeats add column if not exists leaving_since timestamptz;
alter table poller_heartbeats add column if not exists applied_at timestamptz;
alter table poller_topology add column if not exists failover_s int not null default 15;

insert into soundcheck_migrations (version, name)
values (8, '008_failover') on conflict (version) do nothing;
