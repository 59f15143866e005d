"""Email over SMTP (aiosmtplib): STARTTLS or TLS, optional authentication, a plain-text
and an HTML part. The Message-ID is derived from the notice, so a receiver that sees the
same notice twice (a send whose outcome was lost with its process) can tell."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, parseaddr

import aiosmtplib

from ..models import Notice
from ..settings import Settings
from . import DeliveryError
from .render import html_body, subject, text

# Headers folded at 998 characters (RFC 5322's limit), not 78: the standard library folds a
# subject just over 78 characters before its first word, which readers show with a
# leading space.
_POLICY = SMTP.clone(max_line_length=998)


class EmailChannel:
    name = "email"

    def __init__(self, settings: Settings) -> None:
        assert settings.notify_smtp_host is not None and settings.notify_mail_from
        self._s = settings
        self._domain = settings.notify_mail_from.rpartition("@")[2].strip("> ")

    async def start(self) -> None:
        pass  # one connection per message: notices are rare, and idle SMTP sessions time out

    def message(self, n: Notice) -> EmailMessage:
        s = self._s
        msg = EmailMessage()
        msg["From"] = s.notify_mail_from
        msg["To"] = n.job.notification_email
        msg["Subject"] = subject(n)
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = f"<soundcheck-notice-{n.id}@{self._domain}>"
        msg.set_content(text(n, s.notify_app_base_url))
        msg.add_alternative(html_body(n, s.notify_app_base_url), subtype="html")
        return msg

    async def send(self, notice: Notice) -> None:
        s = self._s
        if "@" not in notice.job.notification_email:
            raise DeliveryError("the job's notification_email is not an address",
                                permanent=True)
        try:
            await aiosmtplib.send(
                self.message(notice).as_bytes(policy=_POLICY),
                sender=parseaddr(s.notify_mail_from or "")[1],
                recipients=[notice.job.notification_email],
                hostname=s.notify_smtp_host, port=s.notify_smtp_port,
                username=s.notify_smtp_username,
                password=(s.notify_smtp_password.get_secret_value()
                          if s.notify_smtp_password else None),
                start_tls=s.notify_smtp_tls == "starttls", use_tls=s.notify_smtp_tls == "tls",
                cert_bundle=s.notify_smtp_ca_file, timeout=s.notify_timeout_ms / 1000)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"SMTP refused the recipient: {_codes(exc)}",
                                permanent=True) from None
        except aiosmtplib.SMTPResponseException as exc:
            # 5xx: the server will not take it (bad sender, auth refused, message refused);
            # 4xx: try later.
            raise DeliveryError(f"SMTP answered {exc.code} {exc.message}",
                                permanent=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"SMTP unreachable ({type(exc).__name__}: {exc})") from None

    async def close(self) -> None:
        pass


def _codes(exc: aiosmtplib.SMTPRecipientsRefused) -> str:
    return ", ".join(f"{r.code} {r.message}" for r in exc.recipients) or str(exc)
