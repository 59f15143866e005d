-- soundcheck-migrate: no-transaction
--
-- Full reads through an index of each running job's bucket. Before, a replica's full read
-- walked every running job in id order and hashed each one to keep its own: at a million
-- jobs a page of 5,000 cost 70-80 ms, and the whole read grew with the fleet's jobs, not
-- the replica's. With this index a page is a range scan of the replica's own buckets
-- (poller_jobs_in_buckets, repeatable/20_sync.sql).
--
-- CONCURRENTLY, so the app keeps writing jobs while it builds (see 005); run the statements
-- one at a time in the Supabase SQL editor. The index holds only the job's id and its
-- bucket, which never change: updates of last_ping_at stay HOT (no index write).

set lock_timeout = '5s';

-- A build that failed leaves an INVALID index: drop it so the build below starts again.
do $$
declare
    v_index regclass := to_regclass('jobs_running_bucket_idx');
begin
    if v_index is not null
       and not (select indisvalid from pg_index where indexrelid = v_index) then
        raise notice 'dropping % (an invalid index left by a failed build)', v_index;
        execute format('drop index %s', v_index);
    end if;
end
$$;

set lock_timeout = 0;

-- The expression is soundcheck_bucket(id) written out, as poller_jobs_in_buckets writes
-- it: the planner matches an expression index only on the same expression, and never
-- looks inside a function.
create index concurrently if not exists jobs_running_bucket_idx
    on jobs ((((('x' || substr(md5(lower(id::text)), 1, 8))::bit(32)::bigint) % 1024)::int), id)
    where status = 'running' and monitoring_mode = 'real_polling';

insert into soundcheck_migrations (version, name)
values (11, '011_bucket_index') on conflict (version) do nothing;
