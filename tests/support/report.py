"""Figures the slow tests measure, printed together at the end of the run (in pytest's
terminal summary, so they show without `-s`): a comparison made by several tests reads as
one table."""

from __future__ import annotations

from collections.abc import Iterator

_TABLES: dict[str, list[str]] = {}


def record(table: str, line: str) -> None:
    _TABLES.setdefault(table, []).append(line)


def tables() -> Iterator[tuple[str, list[str]]]:
    for title, lines in _TABLES.items():
        yield title, sorted(lines)
