"""Earlier releases' trees, taken from git, and their `python -m poller migrate`.

A release's tree is `git archive` of the commit its CHANGELOG entry names, run with this
venv's packages (the dependency pins are the same). Tests that need one skip, saying why,
where the clone has no such history (an sdist, a shallow clone).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

import poller

ROOT = Path(__file__).resolve().parents[2]


def previous_release() -> tuple[str, str]:
    """(version, commit) of the newest CHANGELOG entry before this release."""
    entries = re.findall(r"^## (\S+) — \S+ \(commit ([0-9a-f]{7,40})\)",
                         (ROOT / "CHANGELOG.md").read_text(), re.M)
    older = [(v, c) for v, c in entries if v != poller.__version__]
    assert older, "CHANGELOG.md names no earlier release's commit"
    return older[0]


def checkout(commit: str, dest: Path) -> Path:
    """The tree of `commit` written under `dest`."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git history here to take an earlier release from")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone's history: "
                    f"{archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def env_for(tree: Path | None) -> dict[str, str]:
    """PYTHONPATH for a release's tree (None: this release, as installed here)."""
    if tree is None:
        return {}
    return {"PYTHONPATH": f"{tree}:{tree / 'operator'}"}


async def run_migrate(dsn: str, tree: Path | None) -> str:
    """`python -m poller migrate` of the release in `tree` (None: this one); its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poller", "migrate", cwd=tree or ROOT,
        env={"DATABASE_URL": dsn, "PATH": "/usr/bin:/bin", **env_for(tree)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    return out.decode()
