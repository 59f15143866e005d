"""`python -m poller migrate`: fresh, on the app's existing schema, twice, when blocked, from
an earlier release's layout, and the guard of the repeatable files."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest

from poller.localpg import LocalPostgres
from poller.migrate import MigrationError, migrate, migrations, repeatables
from poller.store import API_VERSION
from tests.support.db import RECORD_SAMPLES, add_jobs
from tests.support.postgrest_standin import prepare_database
from tests.support.releases import ROOT, checkout, previous_release, run_migrate

APP_SCHEMA = (Path(__file__).parent / "sql" / "app_schema.sql").read_text()


def schema_dump(pg: LocalPostgres, dsn: str) -> str:
    out = subprocess.run([str(pg.bindir / "pg_dump"), "--schema-only", "--no-owner", dsn],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    # \restrict lines carry a random key per dump (pg_dump security fix of 2025).
    noise = ("-- Dumped", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in out.splitlines() if not line.startswith(noise))


async def test_fresh_database_gets_the_sound_check_shape(fresh_db: str) -> None:
    report = await migrate(fresh_db)
    assert report == [(m.name, True) for m in migrations()] + [
        (f"repeatable/{r.name}", True) for r in repeatables()]
    conn = await asyncpg.connect(fresh_db)
    try:
        enums = {r["typname"] for r in await conn.fetch(
            "select typname from pg_type where typtype = 'e'")}
        assert {"job_status", "sample_status", "alert_state", "job_reason"} <= enums
        tables = {r["tablename"]: r["rowsecurity"] for r in await conn.fetch(
            "select tablename, rowsecurity from pg_tables where schemaname = 'public'")}
        assert all(tables[t] for t in ("jobs", "samples", "sample_rollups", "alerts"))
        assert await conn.fetchval("select poller_api_version()") == API_VERSION
        with pytest.raises(asyncpg.CheckViolationError):  # the app's target check holds
            await conn.execute(
                "insert into jobs (account_number, reason, notification_email, requester_id,"
                " requester_name) values ('A', 'proactive', 'e', gen_random_uuid(), 'n')")
    finally:
        await conn.close()


async def test_second_run_changes_nothing(pg_server: LocalPostgres, fresh_db: str) -> None:
    await migrate(fresh_db)
    before = schema_dump(pg_server, fresh_db)
    report = await migrate(fresh_db)
    assert all(not applied for _, applied in report)
    assert schema_dump(pg_server, fresh_db) == before


async def test_existing_app_schema_only_gains(pg_server: LocalPostgres, fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute(APP_SCHEMA)
        columns = [r["attname"] for r in await conn.fetch(
            "select attname from pg_attribute where attrelid = 'jobs'::regclass "
            "and attnum > 0 and not attisdropped order by attnum")]
        app_columns = ", ".join(f'"{c}"' for c in columns)
        jobs_before = await conn.fetch(f"select {app_columns} from jobs order by id")
        samples_before = await conn.fetch("select * from samples order by id")
        await migrate(fresh_db)
        assert await conn.fetch(f"select {app_columns} from jobs order by id") == jobs_before
        # jobs gains only the alert cursor: two nullable columns, null until evaluated.
        added = await conn.fetch(
            "select attname, attnotnull from pg_attribute where attrelid = 'jobs'::regclass "
            "and attnum > 0 and not attisdropped and attname <> all($1::text[])", columns)
        assert {(r["attname"], r["attnotnull"]) for r in added} == {
            ("poller_alert_seq", False), ("poller_alert_run", False)}
        assert await conn.fetchval("select count(*) from jobs where poller_alert_seq is not "
                                   "null or poller_alert_run is not null") == 0
        assert await conn.fetch("select * from samples order by id") == samples_before
        # The app's own rollups function and table shape were kept, not replaced.
        assert await conn.fetchval(
            "select pg_get_function_result('create_job_rollups(uuid, integer)'::regprocedure)"
        ) == "void"
        assert await conn.fetchval(
            "select count(*) from information_schema.columns "
            "where table_name = 'sample_rollups' and column_name = 'uptime_pct'") == 1
        # What the poller needs was added.
        assert await conn.fetchval(
            "select to_regclass('samples_job_id_sequence_number_key') is not null")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "insert into samples (job_id, sequence_number, status) values "
                "('11111111-1111-1111-1111-111111111111', 1, 'missed')")
        # The API is not callable by the browser's roles, only by the service role.
        for role, allowed in (("anon", False), ("authenticated", False),
                              ("service_role", True)):
            got = await conn.fetchval(
                "select has_function_privilege($1, 'poller_sync_jobs(int, int[])', 'execute')",
                role)
            assert got is allowed, role
        before = schema_dump(pg_server, fresh_db)
        await migrate(fresh_db)
        assert schema_dump(pg_server, fresh_db) == before
    finally:
        await conn.close()


async def test_duplicate_samples_stop_with_instructions(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute(APP_SCHEMA)
        await conn.execute(
            "insert into samples (job_id, sequence_number, status) values "
            "('11111111-1111-1111-1111-111111111111', 1, 'missed')")
        with pytest.raises(MigrationError) as err:
            await migrate(fresh_db)
        text = str(err.value)
        assert "1 duplicated (job_id, sequence_number) pairs" in text
        assert "DELETE FROM samples" in text  # says what to do
        # The migrations before it were kept; the unique key was not built, and nothing
        # after it ran (no function file either); no row was touched.
        assert not await conn.fetchval(
            "select to_regclass('samples_job_id_sequence_number_key') is not null")
        assert [r["version"] for r in await conn.fetch(
            "select version from soundcheck_migrations order by version")] == [1, 4]
        assert await conn.fetchval("select to_regprocedure('poller_api_version()')") is None
        assert await conn.fetchval("select count(*) from samples") == 3
        # Following the hint unblocks it.
        hint = text.split("hint: ", 1)[1]
        await conn.execute(hint.split("run the migration again: ", 1)[1])
        await migrate(fresh_db)
        assert await conn.fetchval("select poller_api_version()") == API_VERSION
    finally:
        await conn.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "poller", "migrate", *args], env=full_env,
                          capture_output=True, text=True, timeout=120)


async def test_cli_applies_then_reports_already_applied(fresh_db: str) -> None:
    first = _cli(env={"DATABASE_URL": fresh_db})
    assert first.returncode == 0, first.stderr
    assert "004_topology: applied" in first.stderr
    assert "repeatable/50_samples: applied" in first.stderr
    second = _cli("--database-url", fresh_db)
    assert second.returncode == 0
    assert "004_topology: already applied" in second.stderr
    assert "repeatable/50_samples: already applied" in second.stderr


def test_cli_without_a_database_url_exits_2() -> None:
    proc = _cli()
    assert proc.returncode == 2
    assert "DATABASE_URL" in proc.stderr


def test_cli_unreachable_database_hides_the_password() -> None:
    proc = _cli(env={"DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/db"})
    assert proc.returncode == 1
    assert "hunter2" not in proc.stderr + proc.stdout
    assert "cannot reach the database" in proc.stderr


async def test_the_poller_writes_sample_ids_in_time_order(conn: asyncpg.Connection) -> None:
    """poller_record_samples: version 7 UUIDs whose first 48 bits are the ping's time in ms, so the
    primary key's index grows at its right edge (random ids touch a random page each)."""
    [job] = await add_jobs(conn, ["127.0.0.1"])
    start = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    times = [start + timedelta(milliseconds=250 * k) for k in range(8)]
    await conn.fetchval(
        "select poller_record_samples($1::uuid[], $2::int[], $3::text[], $4::float8[], "
        "$5::float8[], $6::timestamptz[], '{}', 60)",
        [job] * 8, list(range(8)), ["success"] * 8, [1.0] * 8, [None] * 8, times)
    rows = await conn.fetch("select id, recorded_at from samples where job_id = $1 "
                            "order by sequence_number", job)
    ids = [UUID(str(r["id"])) for r in rows]
    assert [i.version for i in ids] == [7] * 8
    assert [i.variant for i in ids] == ["specified in RFC 4122"] * 8
    assert [i.int >> 80 for i in ids] == [int(t.timestamp() * 1000) for t in times]
    assert ids == sorted(ids) and len(set(ids)) == 8


@pytest.mark.slow  # seconds: out of the fast lane
async def test_jobs_keep_room_for_the_pollers_updates(conn: asyncpg.Connection) -> None:
    # Migration 016: each batch moves every written job's row; with room on its page the
    # new version is a HOT update (no new index entries, the table does not grow). The
    # hard case: all jobs of a page in one batch (jobs created together).
    assert await conn.fetchval(
        "select reloptions from pg_class where oid = 'jobs'::regclass") == ["fillfactor=80"]
    jobs = await add_jobs(conn, [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(3000)])
    await conn.execute("set stats_fetch_consistency = none; select pg_stat_force_next_flush()")
    before = await conn.fetchrow("select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables "
                                 "where relname = 'jobs'")
    for k in range(20):
        await conn.fetchval(RECORD_SAMPLES, jobs, [k] * len(jobs), ["success"] * len(jobs),
                            [1.0] * len(jobs), [None] * len(jobs),
                            [datetime.now(UTC)] * len(jobs), [], 60)
    await conn.execute("select pg_stat_force_next_flush()")
    after = await conn.fetchrow("select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables "
                                "where relname = 'jobs'")
    updates = after["n_tup_upd"] - before["n_tup_upd"]
    hot = after["n_tup_hot_upd"] - before["n_tup_hot_upd"]
    assert updates >= 20 * len(jobs)
    assert hot >= 0.75 * updates, (hot, updates)  # 86 % measured; filled to 100 %: 3 %


async def test_a_fill_factor_already_chosen_for_jobs_is_kept(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute(APP_SCHEMA)
        await conn.execute("alter table jobs set (fillfactor = 70)")
        await migrate(fresh_db)
        assert await conn.fetchval(
            "select reloptions from pg_class where oid = 'jobs'::regclass") == [
                "fillfactor=70"]
    finally:
        await conn.close()


# Where an upgrade starts from, one state per layout the SQL has had: the previous release
# (its migrations 002-016 redefined functions in place) and the last commit before the
# repeatable files (migration 017 on top of that).
EARLIER = {"previous release": previous_release()[1], "migration 017": "25a400c"}


@asynccontextmanager
async def _database(pg: LocalPostgres) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """An empty database with Supabase's roles and default privileges, as the app's has."""
    name = f"layout_{uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg.dsn)
    await admin.execute(f"create database {name}")
    dsn = pg.dsn.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(dsn)
    try:
        await prepare_database(conn)
        yield dsn, conn
    finally:
        await conn.close()
        await admin.execute(f"drop database {name} with (force)")
        await admin.close()


@pytest.mark.slow  # an earlier release's migrate in a process of its own
@pytest.mark.parametrize("start", sorted(EARLIER))
async def test_an_upgraded_database_has_the_schema_of_a_fresh_one(
        pg_server: LocalPostgres, tmp_path: Path, start: str) -> None:
    tree = checkout(EARLIER[start], tmp_path)
    async with _database(pg_server) as (old_dsn, old), _database(pg_server) as (new_dsn, _):
        await run_migrate(old_dsn, tree)
        before = schema_dump(pg_server, old_dsn)
        await migrate(old_dsn)
        upgraded = schema_dump(pg_server, old_dsn)
        await migrate(new_dsn)
        fresh = schema_dump(pg_server, new_dsn)
        assert before != fresh  # the upgrade had something to do
        assert upgraded.splitlines() == fresh.splitlines()
        # The earlier release's migrate, run again on either (a rollback of the pollers
        # does not roll back the schema), finds nothing to do: no old body comes back.
        for dsn in (old_dsn, new_dsn):
            await run_migrate(dsn, tree)
            assert schema_dump(pg_server, dsn).splitlines() == fresh.splitlines(), dsn
        # The functions the earlier release renamed rather than replaced are there once.
        assert await old.fetchval(
            "select count(*) from pg_proc where proname like 'soundcheck_evaluate_alerts%'"
        ) == 2


async def test_an_old_copy_of_a_function_file_is_refused(conn: asyncpg.Connection) -> None:
    """The guard covers bodies: a file pasted from an older release cannot put back the
    function bodies a newer one installed."""
    [samples] = [r for r in repeatables() if r.name == "50_samples"]
    newer = samples.sql.replace(f"('50_samples', {samples.revision})",
                                f"('50_samples', {samples.revision + 1})").replace(
        "as $$\ndeclare\n    v_n int", "as $$\n-- newer\ndeclare\n    v_n int", 1)
    await conn.execute(newer)  # a later release's file, pasted
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as err:
        await conn.execute(samples.sql)  # this release's, now an old copy
    assert f"revision {samples.revision}, older than revision {samples.revision + 1}" in str(
        err.value)
    assert "-- newer" in await conn.fetchval(
        "select pg_get_functiondef('poller_record_samples'::regproc)")


async def test_migrate_refuses_a_file_that_changed_but_kept_its_revision(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("update soundcheck_repeatables set checksum = 'edited' "
                           "where name = '60_notices'")
        with pytest.raises(MigrationError, match="must raise the revision"):
            await migrate(dsn)
        await conn.execute("update soundcheck_repeatables set revision = revision + 1 "
                           "where name = '60_notices'")
        with pytest.raises(MigrationError, match="an old release's file"):
            await migrate(dsn)
    finally:
        await conn.close()


async def test_a_pasted_file_is_applied_again_by_migrate(dsn: str) -> None:
    """A file pasted into the SQL editor records no checksum: migrate applies it again, so
    what the database runs is this release's file, whatever was pasted."""
    [notices] = [r for r in repeatables() if r.name == "60_notices"]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(notices.sql)
        assert await conn.fetchval("select checksum from soundcheck_repeatables "
                                   "where name = '60_notices'") is None
        report = dict(await migrate(dsn))
        assert report["repeatable/60_notices"] and report["repeatable/90_lock_down"]
        assert not report["repeatable/50_samples"]
        assert await conn.fetchval("select checksum from soundcheck_repeatables "
                                   "where name = '60_notices'") == notices.checksum
    finally:
        await conn.close()


def _revision(text: str) -> int:
    found = re.search(r"^insert into soundcheck_repeatables \(name, revision\) values "
                      r"\('[a-z0-9_]+', (\d+)\)$", text, re.M)
    assert found, "no revision statement"
    return int(found.group(1))


def test_a_changed_function_file_raised_its_revision() -> None:
    """Every version of each repeatable file in git history, and the working tree's, has a
    higher revision than the version before it (migrate refuses the same revision with
    other content, so a database migrated at any commit can be migrated again)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git history here")
    for rep in repeatables():
        path = f"poller/sql/repeatable/{rep.name}.sql"
        commits = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%H", "--", path],
                                 capture_output=True, text=True, timeout=60,
                                 check=True).stdout.split()
        texts = [subprocess.run(["git", "-C", str(ROOT), "show", f"{c}:{path}"],
                                capture_output=True, text=True, timeout=60).stdout
                 for c in reversed(commits)] + [rep.sql]
        texts = [t for t in texts if t]  # a commit that deleted it
        for older, newer in itertools.pairwise(texts):
            if older != newer:
                assert _revision(newer) > _revision(older), path
