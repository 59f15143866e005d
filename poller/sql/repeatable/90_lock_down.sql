-- soundcheck-migrate: after-any-change
--
-- Who may use what the migrations created: the service role (the poller, the operator) and
-- the owner, nobody else. `python -m poller migrate` applies this file after every run
-- that applied anything (the line above); paste it last.
--
-- Supabase's default privileges grant every new table, function and sequence in `public`
-- to `anon` (the key every browser holds), `authenticated` and `service_role`, and
-- PostgREST lets each of them call any function it may execute. So this revokes, from
-- PUBLIC, anon and authenticated, everything on:
--   - every function named poller_* or soundcheck_*, and any other the migrations created
--     (marked with the comment 'soundcheck-poller');
--   - the tables poller_*, soundcheck_migrations and soundcheck_repeatables (whose rows
--     decide which files run: a forged row would make one be skipped), and turns their row
--     level security on;
-- and grants the service role what the API needs. `soundcheck_lock_down()` is itself
-- callable by nobody but the owner. A migration that creates a table turns its row level
-- security on itself, so the table is closed from the moment it exists, before this runs.
insert into soundcheck_repeatables (name, revision) values ('90_lock_down', 1)
on conflict (name) do update set revision = excluded.revision, checksum = null;
set local lock_timeout = '5s';

create or replace function soundcheck_lock_down()
returns void
language plpgsql
set search_path = public, pg_temp
as $$
declare
    v_fn regprocedure;
    v_table regclass;
    v_role text;
    v_browser text[] := array(select rolname::text from pg_roles
                              where rolname in ('anon', 'authenticated'));
    v_service bool := exists (select 1 from pg_roles where rolname = 'service_role');
begin
    for v_fn in
        select p.oid::regprocedure
        from pg_proc p
        where p.pronamespace = 'public'::regnamespace
          and (p.proname ~ '^(poller|soundcheck)_'
               or obj_description(p.oid, 'pg_proc') = 'soundcheck-poller')
    loop
        execute format('alter function %s set search_path = public, pg_temp', v_fn);
        execute format('revoke all on function %s from public', v_fn);
        foreach v_role in array v_browser loop
            execute format('revoke all on function %s from %I', v_fn, v_role);
        end loop;
        if v_service and v_fn <> 'soundcheck_lock_down()'::regprocedure then
            execute format('grant execute on function %s to service_role', v_fn);
        end if;
    end loop;
    for v_table in
        select c.oid::regclass
        from pg_class c
        where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
          and (c.relname ~ '^poller_'
               or c.relname in ('soundcheck_migrations', 'soundcheck_repeatables'))
    loop
        if not (select relrowsecurity from pg_class where oid = v_table) then
            execute format('alter table %s enable row level security', v_table);
        end if;
        execute format('revoke all on table %s from public', v_table);
        foreach v_role in array v_browser loop
            execute format('revoke all on table %s from %I', v_table, v_role);
        end loop;
        if v_service then
            execute format('grant select, insert, update, delete on table %s to service_role',
                           v_table);
        end if;
    end loop;
end
$$;

select soundcheck_lock_down();
