-- soundcheck-migrate: no-transaction
--
-- The indexes the poller needs, built CONCURRENTLY so the app keeps writing jobs and samples
-- while they build (a plain CREATE INDEX blocks every write to the table until it is done).
-- CONCURRENTLY cannot run inside a transaction: `python -m poller migrate` runs these
-- statements one by one on a session of its own; in the Supabase SQL editor run them one at
-- a time, in order.

-- Give up rather than queue behind the app's long transactions (and block it meanwhile).
set lock_timeout = '5s';

-- One row per (job, slot): any replica pinging slot k writes the same key, so a duplicate
-- is absorbed by ON CONFLICT and a gap stays visible. Rows that already break the key must
-- go first: say which, and how.
do $$
declare
    v_dupes bigint;
begin
    if exists (select 1 from pg_index
               where indexrelid = to_regclass('samples_job_id_sequence_number_key')
                 and indisvalid) then
        return;
    end if;
    select count(*) into v_dupes
    from (select 1 from samples group by job_id, sequence_number having count(*) > 1) as d;
    if v_dupes > 0 then
        raise exception
            'samples holds % duplicated (job_id, sequence_number) pairs, so the unique key the poller needs cannot be added',
            v_dupes
            using hint = 'Keep one row of each pair, then run the migration again: '
                || 'DELETE FROM samples s USING samples t WHERE s.job_id = t.job_id '
                || 'AND s.sequence_number = t.sequence_number AND (s.recorded_at, s.id) > (t.recorded_at, t.id);';
    end if;
end
$$;

-- A concurrent build that failed (a lock timeout, duplicates, a cancel) leaves an INVALID
-- index behind. IF NOT EXISTS would then skip the build and every batch would fail for
-- want of a usable key: drop the leftover so the build below starts again.
do $$
declare
    v_index regclass;
begin
    foreach v_index in array array[to_regclass('samples_job_id_sequence_number_key'),
                                   to_regclass('jobs_running_real_polling_idx')] loop
        if v_index is not null
           and not (select indisvalid from pg_index where indexrelid = v_index) then
            raise notice 'dropping % (an invalid index left by a failed build)', v_index;
            execute format('drop index %s', v_index);
        end if;
    end loop;
end
$$;

-- A concurrent build never blocks the app's reads or writes, but it waits for transactions
-- already running to end: let it wait (a lock timeout would only leave an invalid index).
set lock_timeout = 0;

create unique index concurrently if not exists samples_job_id_sequence_number_key
    on samples (job_id, sequence_number);

create index concurrently if not exists jobs_running_real_polling_idx
    on jobs (id) where status = 'running' and monitoring_mode = 'real_polling';

insert into soundcheck_migrations (version, name)
values (5, '005_online_indexes') on conflict (version) do nothing;
