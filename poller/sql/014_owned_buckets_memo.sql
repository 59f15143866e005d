-- A fleet sync that changed nothing costs 1.7 ms of database time (11 ms before, measured
-- by bench/bench_fleet_scale.py at 10,000 jobs). Before, each
-- fleet sync computed which of the 1,024 buckets its replica pings (a jump hash and
-- a rendezvous per bucket, in PL/pgSQL): 15 ms of a core per sync whatever the job count,
-- so a fleet of 20 replicas syncing every 5 s kept 6 % of a database core busy on answers
-- that change only when the topology or the live set does. They are now kept, keyed by
-- what they depend on. Same arguments and answers (API version 7).
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

-- The computation of 008 keeps its body under a new name; the old name answers from the
-- table below. (Renamed once: where it already was, 008's function is not renamed again.)
do $$ begin
    if to_regprocedure('soundcheck_owned_buckets_computed(int, int[], int[])') is null then
        alter function soundcheck_owned_buckets_live(int, int[], int[])
            rename to soundcheck_owned_buckets_computed;
    end if;
end $$;

-- The buckets p_replica_id pings under any of p_counts when p_live (and itself) are up:
-- kept answers, computed on a miss. (No longer IMMUTABLE: it reads and writes a table.)
create or replace function soundcheck_owned_buckets_live(p_replica_id int, p_counts int[],
                                                         p_live int[])
returns int[]
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_live int[] := array(select distinct r from unnest(coalesce(p_live, '{}')) r order by r);
    v_buckets int[];
    v_used timestamptz;
begin
    select m.buckets, m.used_at into v_buckets, v_used
    from poller_owned_buckets m
    where m.replica_id = p_replica_id and m.counts = p_counts and m.live = v_live;
    if found then
        if v_used < now() - interval '1 hour' then  -- a write an hour, not one a sync
            update poller_owned_buckets m set used_at = now()
            where m.replica_id = p_replica_id and m.counts = p_counts and m.live = v_live;
        end if;
        return v_buckets;
    end if;
    v_buckets := soundcheck_owned_buckets_computed(p_replica_id, p_counts, v_live);
    delete from poller_owned_buckets where used_at < now() - interval '7 days';
    insert into poller_owned_buckets (replica_id, counts, live, buckets)
    values (p_replica_id, p_counts, v_live, v_buckets)
    on conflict do nothing;
    return v_buckets;
end
$$;

select soundcheck_lock_down();

insert into soundcheck_migrations (version, name)
values (14, '014_owned_buckets_memo') on conflict (version) do nothing;
