"""Real poller processes for end-to-end tests: `python -m poller` with its own environment."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import aiohttp

from poller.localpg import free_port
from poller.progress import Progress


class PollerProcess:
    def __init__(self, env: dict[str, str], python: str = sys.executable,
                 cwd: str | None = None) -> None:
        """`python` runs the poller (another venv's, to test an installed copy), in `cwd`."""
        self.python, self.cwd = python, cwd
        self.port = free_port()
        base = {k: v for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")}
        self.env = {**base, "PORT": str(self.port), "PYTHONUNBUFFERED": "1", **env}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.progress = Progress()  # notified on every log line
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "poller", env=self.env, cwd=self.cwd,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            self.progress.notify()

    async def logged(self, text: str, timeout: float = 30, since: int = 0) -> None:
        """Wait for a log line containing `text`, among the lines from index `since` on."""
        async with asyncio.timeout(timeout):
            await self.progress.wait_for(
                lambda: any(text in line for line in self.lines[since:]))

    async def synced(self, timeout: float = 30) -> None:
        """Wait for the log line of the first good sync."""
        await self.logged(" synced: ", timeout)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            rc = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return rc

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()

    async def get(self, path: str) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (aiohttp.ClientSession(timeout=timeout) as session,
                    session.get(f"http://127.0.0.1:{self.port}{path}") as resp):
            body = await (resp.json() if path != "/metrics" else resp.text())
            return resp.status, body

    async def until_ready_is(self, status: int, timeout: float = 30) -> None:
        """Poll /ready (bounded) until it answers `status`."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if (await self.get("/ready"))[0] == status:
                        return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)
