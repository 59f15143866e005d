-- Room on each page of `jobs` for its rows' next versions. The poller writes each running
-- job's row once a cadence (last_ping_at and the alert cursor). Postgres writes the new
-- version beside the old one, with no new index entry (a HOT update), only where the page
-- has room for it, and within one batch every row of a page it writes needs that room at
-- once; the table's default fill leaves none. Share of the poller's updates that were HOT,
-- 3,000 jobs written 20 times (tests/test_migrations.py has the case):
--   filled to            100 %   90 %   80 %
--   batches of 1,000,
--     jobs in any order    57 %   87 %   97 %
--   a page's jobs all in
--     one batch             3 %   64 %   86 %
-- The latter is the common case: jobs created together sit on one page and share a phase.
-- With 5,000 such jobs written 90 times, Postgres spent 40-59 us per sample filled to
-- 100 % (the table grew from 8 to 84 MB, each version a new entry in each index) and
-- 26-31 us filled to 80 %. The table is a quarter larger for it. Existing pages take it
-- up as their rows move, within a cadence. A fill factor someone already chose for the
-- table is kept. Undo with `alter table jobs reset (fillfactor)`.
--
-- SET (fillfactor) takes a SHARE UPDATE EXCLUSIVE lock: the app's reads and writes go on;
-- a running VACUUM of jobs makes it wait (autovacuum gives way to it).
set local lock_timeout = '5s';

do $$ begin
    if not exists (select 1 from pg_class c, unnest(coalesce(c.reloptions, '{}')) o
                   where c.oid = 'jobs'::regclass and o like 'fillfactor=%') then
        alter table jobs set (fillfactor = 80);
    end if;
end $$;

insert into soundcheck_migrations (version, name)
values (16, '016_jobs_fillfactor') on conflict (version) do nothing;
