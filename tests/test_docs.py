"""The docs do not drift from the code: every setting, metric and migration is documented,
every citation of a docs section names a heading that exists, and every relative link
resolves."""

from __future__ import annotations

import re
from pathlib import Path

from poller.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE = [*ROOT.glob("poller/**/*.py"), *ROOT.glob("operator/**/*.py"),
        *ROOT.glob("poller/sql/**/*.sql"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py"),
        *ROOT.glob("Dockerfile.*"), *ROOT.glob("tools/*"), *ROOT.glob("manifests/**/*.yaml"),
        *ROOT.glob("monitoring/**/*.y*ml"), ROOT / ".ci" / "run"]


def docs_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *DOCS.rglob("*.md")])


def headings(path: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_every_setting_is_in_the_settings_reference() -> None:
    reference = (DOCS / "settings.md").read_text()
    aliases = {f.alias for f in Settings.model_fields.values() if f.alias}
    assert aliases
    missing = sorted(a for a in aliases if f"`{a}`" not in reference)
    assert not missing, missing


def test_every_exported_metric_is_documented() -> None:
    names = set()
    for path in [*ROOT.glob("poller/**/*.py"), *ROOT.glob("operator/**/*.py")]:
        names |= set(re.findall(r'"(soundcheck_(?:poller|operator)_[a-z_]+)"', path.read_text()))
    assert len(names) > 20
    text = docs_text()
    missing = sorted(n for n in names if n not in text)
    assert not missing, missing


def test_every_migration_and_function_file_is_in_the_sql_reference() -> None:
    reference = (DOCS / "sql-api.md").read_text()
    files = sorted(p.name for p in (ROOT / "poller" / "sql").glob("*.sql"))
    repeatable = sorted(p.name for p in (ROOT / "poller" / "sql" / "repeatable").glob("*.sql"))
    assert files and repeatable
    assert [f for f in files + repeatable if f"`{f}`" not in reference] == []


def test_citations_of_docs_sections_name_real_headings() -> None:
    """Code and docs cite a section as docs/<page>.md, "<heading>"."""
    cited = 0
    for path in [*CODE, ROOT / "README.md", ROOT / "CHANGELOG.md"]:
        for page, heading in re.findall(r'docs/([a-z-]+\.md), "([^"]+)"', path.read_text()):
            cited += 1
            target = DOCS / page
            assert target.exists(), (path.name, page)
            assert heading in headings(target), (path.name, page, heading)
    assert cited > 10


def test_citations_of_the_readme_name_its_headings() -> None:
    """The README keeps only a few sections; a citation of one it no longer has is stale."""
    readme = headings(ROOT / "README.md")
    for path in CODE:
        for heading in re.findall(r'README, \\?"([^"\\]+)', path.read_text()):
            assert heading in readme, (path.name, heading)


def test_relative_links_resolve() -> None:
    for path in [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS.rglob("*.md")]:
        for href in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in href:
                continue
            assert (path.parent / href).exists(), (path.relative_to(ROOT), href)
