"""Logging: one line per event, JSON when LOG_FORMAT=json, secrets masked in every line.

Masking happens on the final formatted line, so a secret cannot leak through an exception
text or a third-party logger either.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime

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
        return json.dumps(entry, default=str)


class _MaskingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line = self._inner.format(record)
        for secret in self._secrets:
            line = line.replace(secret, MASK)
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
