"""`python -m poller migrate`: apply the SQL files in poller/sql in order.

Each file is idempotent and additive by itself (so it can also be pasted into the Supabase
SQL editor); this runner adds order, the `soundcheck_migrations` ledger so a file already
applied is skipped, and an advisory lock so two runners never interleave.

Most files run as one transaction. A file whose first line is
`-- soundcheck-migrate: no-transaction` (index builds with CONCURRENTLY, which cannot run in
a transaction) runs statement by statement. That and the session-level advisory lock need a
session of our own: run migrations over a direct connection or a session-mode pooler, not
a transaction-mode one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_LOCK_KEY = 0x50_6F_6C_6C  # "Poll": one advisory lock for all Sound Check migrations
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_NO_TRANSACTION = "-- soundcheck-migrate: no-transaction"
_DOLLAR_TAG = re.compile(r"\$[A-Za-z_]*\$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(_NO_TRANSACTION)


class MigrationError(Exception):
    """A migration could not apply; the message says what to do."""


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("poller.sql").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name[:-4], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


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
    """Apply what is missing; returns (name, applied_now) for every migration."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
    report = []
    try:
        await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
        for mig in migrations():
            if await _applied(conn, mig):
                report.append((mig.name, False))
                continue
            try:
                if mig.transactional:
                    async with conn.transaction():
                        await conn.execute(mig.sql)
                else:
                    for statement in statements(mig.sql):
                        await conn.execute(statement)
            except asyncpg.PostgresError as exc:
                hint = f"\nhint: {exc.hint}" if getattr(exc, "hint", None) else ""
                kept = ("nothing of it was kept" if mig.transactional else
                        "the statements before the failing one were kept (each is safe to "
                        "run again)")
                if isinstance(exc, asyncpg.LockNotAvailableError):
                    hint += ("\nhint: a long transaction holds a lock it needs; run the "
                             "migration again when the database is quieter")
                raise MigrationError(
                    f"migration {mig.name} did not apply, {kept}: {exc}{hint}") from None
            report.append((mig.name, True))
    finally:
        if not conn.is_closed():
            try:
                await conn.execute("select pg_advisory_unlock_all()")
            finally:
                await conn.close(timeout=timeout_s)
    return report


async def _applied(conn: asyncpg.Connection, mig: Migration) -> bool:
    if not await conn.fetchval("select to_regclass('soundcheck_migrations') is not null"):
        return False
    return bool(await conn.fetchval(
        "select exists (select 1 from soundcheck_migrations where version = $1)", mig.version))
