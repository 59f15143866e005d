"""`python -m poller demo`: runs everything for real, shows samples, cleans up after itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.netns import NetnsHost, unavailable_reason

pytestmark = pytest.mark.slow


def leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("soundcheck-*")}


def test_demo_runs_and_removes_what_it_made() -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo's ICMP sidecar needs root or ping sockets allowed")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    host = NetnsHost(f"sc-demo-{os.getpid() % 10000}", 5)  # holds the absent address
    host.create()
    before = leftovers()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "poller", "demo", "--duration", "5",
             "--unreachable", host.absent_ip],
            capture_output=True, text=True, timeout=120)
    finally:
        host.destroy()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["poller_exit_code"] == 0 and summary["samples"] >= 10
    table = proc.stdout.split("stopping…", 1)[1]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()
            and not line.startswith("{")}
    assert rows["127.0.0.1"][6] == "success"
    assert rows["::1"][6] == "success"
    assert rows[host.absent_ip][4] != "0"  # missed pings counted
    assert rows["not-an-ip"][6] == "system_error"
    assert leftovers() == before  # its Postgres folder and logs are gone
    assert "\x1b[H" not in proc.stdout  # not a terminal: no redraw codes in the output
