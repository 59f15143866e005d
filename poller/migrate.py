"""`python -m poller migrate`: apply the SQL files in poller/sql in order.

Each file is idempotent and additive by itself (so it can also be pasted into the Supabase
SQL editor); this runner adds order, one transaction per file, a transaction-scoped
advisory lock so two runners never interleave (works through a transaction-mode pooler),
and the `soundcheck_migrations` ledger so a file already applied is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_LOCK_KEY = 0x50_6F_6C_6C  # "Poll": one advisory lock for all Sound Check migrations
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class MigrationError(Exception):
    """A migration could not apply; the message says what to do."""


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("poller.sql").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name[:-4], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


async def migrate(dsn: str, timeout_s: float = 60.0) -> list[tuple[str, bool]]:
    """Apply what is missing; returns (name, applied_now) for every migration."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
    report = []
    try:
        for mig in migrations():
            async with conn.transaction():
                await conn.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY)
                has_ledger = await conn.fetchval(
                    "select to_regclass('soundcheck_migrations') is not null"
                )
                done = has_ledger and await conn.fetchval(
                    "select exists (select 1 from soundcheck_migrations where version = $1)",
                    mig.version,
                )
                if done:
                    report.append((mig.name, False))
                    continue
                try:
                    await conn.execute(mig.sql)
                except asyncpg.PostgresError as exc:
                    hint = f"\nhint: {exc.hint}" if getattr(exc, "hint", None) else ""
                    raise MigrationError(
                        f"migration {mig.name} did not apply, nothing of it was kept: "
                        f"{exc}{hint}"
                    ) from None
                report.append((mig.name, True))
    finally:
        await conn.close(timeout=timeout_s)
    return report
