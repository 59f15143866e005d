"""Secrets never reach a log line, in either format, whatever characters they hold."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import quote

import pytest

from poller import logs

PASSWORD = 'pä"ss\\wörd-Ω'  # a quote, a backslash, non-ASCII: JSON escapes them all
DSN = f"postgresql://poller:{quote(PASSWORD, safe='')}@db.internal:5432/soundcheck"
KEY = 'key-with-"quotes"-and-\\-ünïcode'


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_masked_before_escaping(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure(fmt, "INFO", [DSN, KEY])
    log = logging.getLogger("test.secrets")
    log.info("connecting to %s with %s", DSN, KEY)
    log.info("password alone: %s, decoded", PASSWORD)
    try:
        raise ValueError(f"bad key {KEY!r} for {DSN}")
    except ValueError:
        log.exception("failed")
    out = stream.getvalue()
    logging.getLogger().handlers.clear()
    lines = out.splitlines()
    assert len(lines) == 3  # one line per event, the traceback included
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        out = "\n".join(str(e) for e in entries) + out
    for form in (PASSWORD, quote(PASSWORD, safe=""), json.dumps(PASSWORD)[1:-1], KEY,
                 json.dumps(KEY)[1:-1], repr(KEY)[1:-1]):
        assert form not in out, form
    assert logs.MASK in out
