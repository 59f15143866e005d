"""`python -m poller demo`: runs everything for real, shows samples, cleans up after itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.netns import NetnsHost, unavailable_reason

pytestmark = pytest.mark.slow


def test_demo_runs_and_removes_what_it_made() -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo's ICMP sidecar needs root or ping sockets allowed")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    host = NetnsHost(f"sc-demo-{os.getpid() % 10000}", 5)  # holds the absent address
    host.create()
    try:
        proc = subprocess.run(
            # Long enough for Prometheus' first scrape (discovery takes ~5 s), the offline
            # alert (5 misses, one a second, each known after the 3 s ping timeout) and the
            # short job's completion (~8 s in), with room for a slow start on a busy machine
            # (at 15 s a full-suite run once ended before the alert).
            [sys.executable, "-m", "poller", "demo", "--duration", "20",
             "--unreachable", host.absent_ip],
            capture_output=True, text=True, timeout=120)
    finally:
        host.destroy()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["poller_exit_code"] == 0 and summary["samples"] >= 10
    # The unreachable target went offline; that alert and the short job's completion were
    # mailed to the demo's SMTP sink, and printed.
    assert summary["alerts"] == 1 and summary["mails"] == 2
    assert f"alert offline   {host.absent_ip}" in proc.stdout
    assert f"--- mail to demo@example.com: [Sound Check] OFFLINE: {host.absent_ip}" in proc.stdout
    assert "[Sound Check] PASS: monitoring of 127.0.0.3 (account DEMO-SHORT) complete" in (
        proc.stdout)
    table = proc.stdout.split("stopping…", 1)[1]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()
            and not line.startswith(("{", "Prometheus", "alert"))}
    assert rows["127.0.0.1"][6] == "success"
    assert rows["::1"][6] == "success"
    assert rows[host.absent_ip][4] != "0"  # missed pings counted
    assert rows["not-an-ip"][6] == "system_error"
    if shutil.which("prometheus"):  # it scraped the poller and loaded the alert rules
        rules = (Path(__file__).parent.parent / "monitoring" / "rules.yml").read_text()
        loaded = f"{rules.count('- alert: ')} alert rules loaded; the poller's scrape: up"
        assert loaded in proc.stdout
        # The unreachable target raises none; the demo runs no operator, so the rule that
        # watches for one goes pending, and nothing else.
        active = {line.split()[1] for line in table.splitlines() if line.startswith("alert ")
                  and line.split()[2] in ("pending", "firing")}
        assert active == {"SoundCheckOperatorAbsent"}, table
    # Its Postgres folder and its logs are gone. Named from the output rather than compared
    # with a listing of /tmp, which other processes may be using meanwhile.
    made = [re.search(pattern, proc.stdout) for pattern in (
        r"throwaway PostgreSQL in (\S+)…", r"logs in (\S+) \(removed at the end\)")]
    for found in made:
        assert found and found.group(1).startswith(tempfile.gettempdir())
        assert not Path(found.group(1)).exists()
    assert "\x1b[H" not in proc.stdout  # not a terminal: no redraw codes in the output
