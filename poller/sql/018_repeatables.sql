-- The ledger of the repeatable files (poller/sql/repeatable/: the functions, triggers and
-- the lock-down, each defined in one file and applied again whenever it changed; see
-- docs/sql-api.md, "Repeatable files"). Each such file begins by recording its name and
-- revision here (and clears its checksum); the guard below stops a file whose revision is
-- older than the one the database has, so pasting an old copy cannot put an old function
-- body back. `python -m poller migrate` writes the checksum of what it applied, and skips
-- a file whose checksum it recorded.
--
-- The guard is the one function of a versioned migration: it is this table's constraint
-- (a CHECK cannot compare a row with its previous version) and must exist before any
-- repeatable file runs.
set local lock_timeout = '5s';

create table if not exists soundcheck_repeatables (
    name       text primary key,
    revision   int not null check (revision >= 1),
    checksum   text,
    applied_at timestamptz not null default now()
);
-- No policies: only roles that bypass row level security see it (a forged row could make a
-- file be skipped or refused).
alter table soundcheck_repeatables enable row level security;

create or replace function soundcheck_repeatable_guard()
returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
    if new.revision < old.revision then
        raise exception 'repeatable/%.sql is revision %, older than revision % applied on %',
                        new.name, new.revision, old.revision, old.applied_at
            using errcode = '55000',
                  hint = 'this is an old copy: take the file from the current release';
    end if;
    new.applied_at := now();
    return new;
end
$$;

do $$ begin
    if not exists (select 1 from pg_trigger where tgrelid = 'soundcheck_repeatables'::regclass
                   and tgname = 'soundcheck_repeatable_guard') then
        create trigger soundcheck_repeatable_guard
            before update on soundcheck_repeatables
            for each row execute function soundcheck_repeatable_guard();
    end if;
end $$;

-- Migrations of earlier releases that held only functions, now in the repeatable files:
-- recorded as applied, so an earlier release's migrate run against this database skips
-- them instead of putting their old function bodies back. (Where they ran, their rows are
-- there already.)
insert into soundcheck_migrations (version, name)
values (2, '002_poller_api'), (3, '003_fleet_api'), (7, '007_paged_sync'),
       (13, '013_time_ordered_sample_ids'), (15, '015_held_jobs_skip_evaluation'),
       (17, '017_late_samples')
on conflict (version) do nothing;

insert into soundcheck_migrations (version, name)
values (18, '018_repeatables') on conflict (version) do nothing;
