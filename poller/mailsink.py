"""A local SMTP sink (aiosmtpd) that keeps the messages it receives: the demo prints them,
the tests read them. Optional STARTTLS and authentication, so the real client path (TLS
upgrade, AUTH) is what gets exercised. Loopback only; not a mail server for production."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
from email.message import EmailMessage
from typing import Any

try:
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
except ModuleNotFoundError as exc:  # an optional dependency: say which extra brings it
    raise ModuleNotFoundError(
        "poller.mailsink needs aiosmtpd: pip install 'soundcheck-poller[demo]'",
        name=exc.name) from None

from .progress import Progress


class SmtpSink:
    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        self.port = port
        self.tls = tls
        self.credentials = credentials
        self.messages: list[EmailMessage] = []
        self.recipients: list[list[str]] = []
        self.progress = Progress()  # notified on every message
        self._server: asyncio.Server | None = None
        self._sessions: list[SMTP] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        self.recipients.append(list(envelope.rcpt_tos))
        self.progress.notify()
        return "250 OK"

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and self.credentials is not None
              and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials)
        return AuthResult(success=ok)

    def _protocol(self) -> SMTP:
        kwargs: dict[str, Any] = {"hostname": "localhost"}
        if self.tls is not None:
            kwargs.update(tls_context=self.tls, require_starttls=True)
        if self.credentials is not None:
            kwargs.update(auth_required=True, authenticator=self._authenticate,
                          auth_require_tls=self.tls is not None)
        session = SMTP(self, **kwargs)
        self._sessions.append(session)
        return session

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in self._sessions:  # open connections end too, as in an outage
                if session.transport is not None:
                    session.transport.close()
            self._sessions.clear()
            await self._server.wait_closed()
            self._server = None
