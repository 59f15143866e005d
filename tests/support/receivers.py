"""Real receivers for notice tests: an SMTP server with STARTTLS and AUTH (aiosmtpd via
poller.mailsink, with a throwaway CA from trustme) and an HTTP webhook receiver (aiohttp).
Both can be taken down and brought back on the same port, and made to refuse."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from poller.localpg import free_port
from poller.mailsink import SmtpSink
from poller.progress import Progress

SMTP_USER, SMTP_PASSWORD = "soundcheck", "smtp-secret-9f8e7d"


class ThrowawayCA:
    """A CA made for the run, a server certificate for 127.0.0.1 it signed, and the CA's
    PEM file for the client to trust."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server)
        self._dir = tempfile.TemporaryDirectory()
        self.ca_file = str(Path(self._dir.name) / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def close(self) -> None:
        self._dir.cleanup()


class RefusingSink(SmtpSink):
    """Refuses recipients in `refused` at RCPT, as a real server does (550)."""

    refused: set[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refused:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"


class WebhookSink:
    """Keeps every JSON POST; answers `status` (200 unless told otherwise)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook/token-5c4b3a"
        self.received: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        self.status = 200
        self.progress = Progress()
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        if self.status // 100 == 2:
            self.received.append(await request.json())
            self.keys.append(request.headers.get("Idempotency-Key"))
        self.progress.notify()
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{token}", self._post)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
