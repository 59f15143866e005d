"""Logging: one line per event, JSON when LOG_FORMAT=json, secrets masked in every line.

Secrets are masked in the message and the exception text *before* the line is formatted
(JSON escaping would otherwise turn a secret holding a quote, a backslash or non-ASCII into
a different string that no longer matches), and again in the final line, so a secret cannot
leak through a third-party logger either. A database URL's password is also masked on its
own, raw and percent-decoded.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

MASK = "***"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


def secret_forms(secrets: Iterable[str]) -> list[str]:
    """Every form in which a secret can reach a line: as given; for a URL, its password
    (raw and percent-decoded); and each of those as JSON and repr() escape it. Longest first, so a
    secret containing another is masked whole."""
    forms: set[str] = set()
    for secret in secrets:
        found = {secret}
        try:
            password = urlsplit(secret).password
        except ValueError:
            password = None
        if password:
            found |= {password, unquote(password)}
        for form in list(found):  # as JSON and as repr() (exception texts) escape it
            found.add(json.dumps(form)[1:-1])
            found.add(json.dumps(form, ensure_ascii=False)[1:-1])
            found.add(repr(form)[1:-1])
        forms |= {f for f in found if len(f) >= 4}
    return sorted(forms, key=len, reverse=True)


class _MaskingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        self._secrets = secret_forms(secrets)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def format(self, record: logging.LogRecord) -> str:
        if self._secrets:
            record = copy.copy(record)
            record.msg, record.args = self._mask(record.getMessage()), None
            if record.exc_info:
                record.exc_text = self._mask(self.formatException(record.exc_info))
                record.exc_info = None
        line = self._mask(self._inner.format(record))
        return line.replace("\n", "\\n")  # one line per event, even with a traceback


def configure(fmt: str = "text", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    inner: logging.Formatter
    if fmt == "json":
        inner = _JsonFormatter()
    else:
        inner = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MaskingFormatter(inner, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would be one line per probe request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RateLimited:
    """Logs a message at most once per `every_s` seconds per key."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self._log = logger
        self._every = every_s
        self._last: dict[str, float] = {}

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._every) >= self._every:
            self._last[key] = now
            self._log.log(level, msg, *args)
