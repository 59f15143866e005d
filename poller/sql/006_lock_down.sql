-- Who may use what the migrations created is settled by soundcheck_lock_down()
-- (repeatable/90_lock_down.sql), run after every migration run that changed anything.
-- This file only removes the helper it replaced.
set local lock_timeout = '5s';

-- The text-argument helper of earlier releases pasted its argument into GRANT statements
-- and was executable by anon on Supabase: gone.
drop function if exists soundcheck_restrict_to_service_role(text[]);

insert into soundcheck_migrations (version, name)
values (6, '006_lock_down') on conflict (version) do nothing;
