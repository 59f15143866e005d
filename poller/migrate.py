"""`python -m poller migrate`: bring a database's schema to this release.

Two kinds of files, as in Flyway (docs/sql-api.md, "Migrations" and "Repeatable files"):

- `poller/sql/NNN_*.sql`, versioned migrations: tables, columns, indexes. Each is applied
  once, in order, and recorded in `soundcheck_migrations`; a released one never changes.
- `poller/sql/repeatable/NN_*.sql`: every function and trigger, each defined in exactly one
  file. Applied after the migrations, in name order, whenever the file differs from what
  was applied: its checksum is recorded in `soundcheck_repeatables` with the revision the
  file declares in its first statement. A changed file must raise that revision; the
  database refuses a revision older than its own, so an old copy pasted into the SQL
  editor cannot put an old function body back. A file marked
  `-- soundcheck-migrate: after-any-change` (the lock-down) runs last, whenever any other
  file was applied.

Every file is idempotent by itself (it can also be pasted into the Supabase SQL editor);
this runner adds order, the ledgers, and an advisory lock so two runners never interleave.

Most files run as one transaction. A migration whose first line is
`-- soundcheck-migrate: no-transaction` (index builds with CONCURRENTLY, which cannot run in
a transaction) runs statement by statement. That and the session-level advisory lock need a
session of our own: run migrations over a direct connection or a session-mode pooler, not
a transaction-mode one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_LOCK_KEY = 0x50_6F_6C_6C  # "Poll": one advisory lock for all Sound Check migrations
_VERSIONED = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_REPEATABLE = re.compile(r"^\d{2}_[a-z0-9_]+\.sql$")
_NO_TRANSACTION = "-- soundcheck-migrate: no-transaction"
_AFTER_ANY_CHANGE = "-- soundcheck-migrate: after-any-change"
# The statement each repeatable file begins with: the only place its revision is written.
_RECORD = re.compile(
    r"^insert into soundcheck_repeatables \(name, revision\) values \('([a-z0-9_]+)', (\d+)\)$",
    re.MULTILINE)
_DOLLAR_TAG = re.compile(r"\$[A-Za-z_]*\$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Repeatable:
    name: str
    revision: int
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def after_any_change(self) -> bool:
        return self.sql.startswith(_AFTER_ANY_CHANGE)


class MigrationError(Exception):
    """A migration could not apply; the message says what to do."""


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("poller.sql").iterdir():
        m = _VERSIONED.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name[:-4], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def repeatables() -> list[Repeatable]:
    found = []
    for entry in resources.files("poller.sql").joinpath("repeatable").iterdir():
        if not _REPEATABLE.match(entry.name):
            continue
        sql = entry.read_text("utf-8")
        name = entry.name[:-4]
        record = _RECORD.search(sql)
        if record is None or record.group(1) != name:
            raise ValueError(
                f"repeatable/{entry.name}: its first statement must be "
                f"\"insert into soundcheck_repeatables (name, revision) values ('{name}', N)\"")
        found.append(Repeatable(name, int(record.group(2)), sql))
    return sorted(found, key=lambda r: r.name)


def statements(sql: str) -> list[str]:
    """Split a script at the `;` that ends a line outside dollar quotes (the files' style;
    no semicolons inside plain strings at a line's end)."""
    out: list[str] = []
    current: list[str] = []
    open_tag: str | None = None
    for line in sql.splitlines():
        current.append(line)
        for tag in _DOLLAR_TAG.findall(line.split("--", 1)[0] if open_tag is None else line):
            if open_tag is None:
                open_tag = tag
            elif tag == open_tag:
                open_tag = None
        if open_tag is None and line.rstrip().endswith(";"):
            text = "\n".join(current).strip()
            if any(s.strip() and not s.strip().startswith("--") for s in current):
                out.append(text)
            current = []
    if any(s.strip() and not s.strip().startswith("--") for s in current):
        raise ValueError("a statement at the end of the script has no closing ';'")
    return out


async def migrate(dsn: str, timeout_s: float = 60.0) -> list[tuple[str, bool]]:
    """Apply what is missing; returns (name, applied_now) for every file, migrations first
    (repeatable files are named `repeatable/NN_name`)."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
    report: list[tuple[str, bool]] = []
    try:
        await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
        for mig in migrations():
            if await _applied(conn, mig):
                report.append((mig.name, False))
                continue
            await _run(conn, mig.name, mig.sql)
            report.append((mig.name, True))
        changed = any(applied for _, applied in report)
        reps = repeatables()
        for rep in [r for r in reps if not r.after_any_change] + \
                   [r for r in reps if r.after_any_change]:
            recorded = await conn.fetchrow(
                "select revision, checksum from soundcheck_repeatables where name = $1",
                rep.name)
            due = recorded is None or recorded["checksum"] != rep.checksum
            if not due and not (rep.after_any_change and changed):
                report.append((f"repeatable/{rep.name}", False))
                continue
            if due and recorded is not None:
                _check_revision(rep, recorded["revision"], recorded["checksum"])
            async with conn.transaction():
                await _run(conn, f"repeatable/{rep.name}", rep.sql)
                await conn.execute(
                    "update soundcheck_repeatables set checksum = $2 where name = $1",
                    rep.name, rep.checksum)
            report.append((f"repeatable/{rep.name}", True))
            changed = True
    finally:
        if not conn.is_closed():
            try:
                await conn.execute("select pg_advisory_unlock_all()")
            finally:
                await conn.close(timeout=timeout_s)
    return report


def _check_revision(rep: Repeatable, revision: int, checksum: str | None) -> None:
    if rep.revision < revision:
        raise MigrationError(
            f"repeatable/{rep.name}.sql is revision {rep.revision}, older than revision "
            f"{revision} in the database: this is an old release's file; run the current "
            "release's migrate")
    if rep.revision == revision and checksum is not None:
        raise MigrationError(
            f"repeatable/{rep.name}.sql differs from what was applied as revision "
            f"{revision}: a changed file must raise the revision in its first statement")


async def _run(conn: asyncpg.Connection, name: str, sql: str) -> None:
    """Run one file in a transaction of its own (a savepoint inside the caller's), or, for a
    no-transaction migration, statement by statement."""
    statement_by_statement = sql.startswith(_NO_TRANSACTION)
    try:
        if statement_by_statement:
            for statement in statements(sql):
                await conn.execute(statement)
        else:
            async with conn.transaction():
                await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        hint = f"\nhint: {exc.hint}" if getattr(exc, "hint", None) else ""
        kept = ("the statements before the failing one were kept (each is safe to run again)"
                if statement_by_statement else "nothing of it was kept")
        if isinstance(exc, asyncpg.LockNotAvailableError):
            hint += ("\nhint: a long transaction holds a lock it needs; run the "
                     "migration again when the database is quieter")
        raise MigrationError(f"migration {name} did not apply, {kept}: {exc}{hint}") from None


async def _applied(conn: asyncpg.Connection, mig: Migration) -> bool:
    if not await conn.fetchval("select to_regclass('soundcheck_migrations') is not null"):
        return False
    return bool(await conn.fetchval(
        "select exists (select 1 from soundcheck_migrations where version = $1)", mig.version))
