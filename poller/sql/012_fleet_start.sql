-- A fleet that starts shares its buckets from the first sync: while every live replica's
-- process started within the failover timeout, the replicas of the topology not seen yet
-- count as live (poller_live_replicas, repeatable/30_fleet.sql). Before, the first
-- replica up took every bucket and read and pinged every job until its next sync (at a
-- million jobs: a full read of all of them, sample buffers overflowing for minutes).
set local lock_timeout = '5s';

-- When the replica's process started: its first heartbeat before it applied any sync (set
-- by the trigger soundcheck_heartbeat_started).
-- Null: from before this migration (long ago, as far as the rule is concerned).
alter table poller_heartbeats add column if not exists started_at timestamptz;

insert into soundcheck_migrations (version, name)
values (12, '012_fleet_start') on conflict (version) do nothing;
