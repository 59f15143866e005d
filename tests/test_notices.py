"""Delivery of alerts and completion notices through real receivers: an SMTP server with
STARTTLS and AUTH, and an HTTP webhook receiver. Every channel goes through the same
contract cases; the delivery loop runs against a real Postgres on both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from uuid import UUID, uuid4

import asyncpg
import pytest

from poller.localpg import free_port
from poller.metrics import Metrics
from poller.models import JobSummary, Notice, NoticeJob, NoticeKind
from poller.notices import Channel, DeliveryError, make_channels, render
from poller.notices.delivery import Deliverer
from poller.settings import Settings
from poller.store import Store, make_store
from tests.conftest import DbEnv
from tests.support.db import RECORD_SAMPLES, add_jobs
from tests.support.latency_standin import NO_REPLY, LatencyStandIn
from tests.support.processes import PollerProcess
from tests.support.receivers import SMTP_PASSWORD, SMTP_USER, RefusingSink, ThrowawayCA, WebhookSink

BASE_URL = "https://soundcheck.example.com"


@pytest.fixture(scope="module")
def ca() -> Iterator[ThrowawayCA]:
    ca = ThrowawayCA()
    yield ca
    ca.close()


@pytest.fixture
async def smtp(ca: ThrowawayCA) -> AsyncIterator[RefusingSink]:
    sink = RefusingSink(free_port(), tls=ca.server, credentials=(SMTP_USER, SMTP_PASSWORD))
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture
async def hook() -> AsyncIterator[WebhookSink]:
    sink = WebhookSink()
    await sink.start()
    yield sink
    await sink.stop()


def notify_env(ca: ThrowawayCA, smtp: RefusingSink | None = None,
               hook: WebhookSink | None = None, **extra: str) -> dict[str, str]:
    env = {"NOTIFY_APP_BASE_URL": BASE_URL, "NOTIFY_INTERVAL_MS": "100",
           "NOTIFY_TIMEOUT_MS": "3000", **extra}
    if smtp is not None:
        env |= {"NOTIFY_SMTP_HOST": "127.0.0.1", "NOTIFY_SMTP_PORT": str(smtp.port),
                "NOTIFY_SMTP_USERNAME": SMTP_USER, "NOTIFY_SMTP_PASSWORD": SMTP_PASSWORD,
                "NOTIFY_SMTP_CA_FILE": ca.ca_file,
                "NOTIFY_MAIL_FROM": "Sound Check <noreply@soundcheck.example.com>"}
    if hook is not None:
        env["NOTIFY_WEBHOOK_URL"] = hook.url
    return env


def _settings(env: dict[str, str]) -> Settings:
    return Settings.from_env({"DATABASE_URL": "postgresql://unused@127.0.0.1/x", **env})


def _part(msg: EmailMessage, subtype: str) -> str:
    """The text of the message's body of this subtype, which it must have."""
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    text: str = part.get_content()
    return text


def _notice(kind: NoticeKind = "completion", email: str = "noc@example.com",
            notice_id: int = 41) -> Notice:
    job = NoticeJob(uuid4(), "ACC-77", "192.0.2.44", email, "Ann <Ops>", 10, 60,
                    datetime(2026, 11, 29, 9, 0, tzinfo=UTC),
                    datetime(2026, 11, 29, 10, 0, tzinfo=UTC))
    summary = JobSummary(360, 352, 6, 2, 12.5, 80.25, 41.0, 1, 5)
    if kind == "completion":
        return Notice(notice_id, "completion", 1, job, summary=summary)
    return Notice(notice_id, kind, 1, job,
                  triggered_at=datetime(2026, 11, 29, 9, 30, tzinfo=UTC))


# The channel contract: every channel, the same cases -------------------------------------

class Receiver:
    """A channel with its receiver, seen the same way whatever the channel."""

    def __init__(self, channel: Channel, sink: RefusingSink | WebhookSink) -> None:
        self.channel, self.sink = channel, sink

    def count(self) -> int:
        if isinstance(self.sink, RefusingSink):
            return len(self.sink.messages)
        return len(self.sink.received)

    def refuse(self, notice: Notice) -> None:
        if isinstance(self.sink, RefusingSink):
            self.sink.refused.add(notice.job.notification_email)
        else:
            self.sink.status = 422


@pytest.fixture(params=["email", "webhook"])
async def receiver(request: pytest.FixtureRequest, ca: ThrowawayCA, smtp: RefusingSink,
                   hook: WebhookSink) -> AsyncIterator[Receiver]:
    env = notify_env(ca, smtp if request.param == "email" else None,
                     hook if request.param == "webhook" else None)
    [channel] = make_channels(_settings(env))
    await channel.start()
    yield Receiver(channel, smtp if request.param == "email" else hook)
    await channel.close()


async def test_a_channel_delivers_once_per_send(receiver: Receiver) -> None:
    await receiver.channel.send(_notice())
    await receiver.channel.send(_notice("offline", notice_id=42))
    assert receiver.count() == 2


async def test_a_receiver_that_is_down_is_worth_retrying(receiver: Receiver) -> None:
    await receiver.sink.stop()
    with pytest.raises(DeliveryError) as err:
        await receiver.channel.send(_notice())
    assert not err.value.permanent
    await receiver.sink.start()  # back on the same port: it goes through
    await receiver.channel.send(_notice())
    assert receiver.count() == 1


async def test_a_refusal_is_permanent(receiver: Receiver) -> None:
    notice = _notice()
    receiver.refuse(notice)
    with pytest.raises(DeliveryError) as err:
        await receiver.channel.send(notice)
    assert err.value.permanent
    assert receiver.count() == 0


# What the messages say ------------------------------------------------------------------

async def test_the_completion_mail_reads_well(ca: ThrowawayCA, smtp: RefusingSink) -> None:
    [channel] = make_channels(_settings(notify_env(ca, smtp)))
    notice = _notice()
    await channel.send(notice)
    [msg] = smtp.messages
    assert smtp.recipients == [["noc@example.com"]]
    assert msg["Subject"] == ("[Sound Check] PASS: monitoring of 192.0.2.44 (account ACC-77) "
                              "complete")
    assert msg["Message-ID"] == "<soundcheck-notice-41@soundcheck.example.com>"
    plain, html = (_part(msg, kind) for kind in ("plain", "html"))
    for text in (plain, html):
        assert "ACC-77" in text and "192.0.2.44" in text
        assert "every 10 s" in text and "60 min" in text
        assert "1.68 %" in text  # 6 / (352 + 6)
        assert "p95 41.00 ms" in text
        assert f"{BASE_URL}/jobs/{notice.job.id}" in text
        assert "PASS" in text  # 1.68 % loss, p95 41 ms
        assert "352 success, 6 missed, 2 system error" in text
        assert "360 of 360 slots (100.0 %)" in text
        assert "Warning" not in text
    assert "Ann <Ops>" in plain and "Ann &lt;Ops&gt;" in html  # escaped in HTML


def test_a_partly_covered_job_says_so_in_every_form() -> None:
    """7 samples of a 360-slot job: still PASS by the app's rules, with the coverage stated
    and warned about in the text, the HTML and the webhook payload."""
    full = _notice()
    notice = Notice(41, "completion", 1, full.job,
                    summary=JobSummary(7, 7, 0, 0, 12.5, 20.0, 19.0, 0, 0))
    assert render.subject(notice).startswith("[Sound Check] PASS")
    for text, warning in ((render.text(notice, BASE_URL), "7 of the job's 360 slots"),
                          (render.html_body(notice, BASE_URL), "7 of the job&#x27;s 360 slots")):
        assert "7 of 360 slots (1.9 %)" in text
        assert warning in text
    payload = render.webhook_payload(notice, BASE_URL)["summary"]
    assert payload["slots"] == 360 and payload["coverage"] == pytest.approx(7 / 360)
    assert payload["warnings"] and "7 of the job's 360 slots" in payload["warning"]


async def test_the_webhook_payload(ca: ThrowawayCA, hook: WebhookSink) -> None:
    [channel] = make_channels(_settings(notify_env(ca, hook=hook)))
    await channel.start()
    try:
        await channel.send(_notice("offline"))
    finally:
        await channel.close()
    [body] = hook.received
    assert hook.keys == ["soundcheck-notice-41"]
    assert body["kind"] == "offline" and body["text"].startswith("[Sound Check] OFFLINE")
    assert body["job"]["url"].startswith(f"{BASE_URL}/jobs/")
    assert body["triggered_at"] == "2026-11-29T09:30:00+00:00"


# The delivery loop, against a real Postgres (both transports) ----------------------------



async def _completed_jobs(conn: asyncpg.Connection, n: int, email: str = "noc@example.com"
                          ) -> list[UUID]:
    """n jobs completed through a batch: one completion notice each."""
    ids = await add_jobs(conn, [f"192.0.2.{i + 1}" for i in range(n)], duration_minutes=1,
                         started_at=datetime.now(UTC) - timedelta(minutes=2))
    await conn.execute("update jobs set notification_email = $1 where id = any($2::uuid[])",
                       email, ids)
    await conn.fetchval(RECORD_SAMPLES, [], [], [], [], [], [], ids, 60)
    return ids


async def _offline_job(conn: asyncpg.Connection) -> UUID:
    """A job whose first 5 samples missed: one offline alert."""
    started = datetime.now(UTC) - timedelta(seconds=10)
    [job] = await add_jobs(conn, ["192.0.2.200"], started_at=started)
    await conn.fetchval(RECORD_SAMPLES, [job] * 5, list(range(5)), ["missed"] * 5,
                        [None] * 5, [None] * 5,
                        [started + timedelta(seconds=k) for k in range(5)], [], 60)
    return job


class Delivery:
    """A deliverer (with its own store) running in the background."""

    def __init__(self, env: dict[str, str]) -> None:
        self.settings = Settings.from_env(env)
        self.metrics = Metrics()
        self.store: Store = make_store(self.settings)
        self.deliverer = Deliverer(self.store, make_channels(self.settings), self.settings,
                                   self.metrics)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Delivery:
        await self.store.open()
        self._task = asyncio.create_task(self.deliverer.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.deliverer.stop()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)
        await self.store.close()

    def count(self, name: str, channel: str | None = None) -> float:
        return self.metrics.value(name, {"channel": channel} if channel else None)

    async def until(self, cond: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            await self.deliverer.progress.wait_for(cond)


async def _outbox(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch("select * from poller_outbox order by id")
    return rows


async def test_an_smtp_outage_delays_notices_and_sends_each_once(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, ca: ThrowawayCA,
        smtp: RefusingSink) -> None:
    await _completed_jobs(conn, 3)
    await _offline_job(conn)
    await smtp.stop()
    async with Delivery({**await db_env(dsn), **notify_env(ca, smtp)}) as d:
        await d.until(lambda: d.count("soundcheck_poller_notice_failures_total", "email") >= 8)
        rows = await _outbox(conn)
        assert {r["status"] for r in rows} == {"pending"} and min(
            r["attempts"] for r in rows) >= 2
        await smtp.start()
        await d.until(lambda: d.count("soundcheck_poller_notices_sent_total", "email") == 4)
    assert len(smtp.messages) == 4
    assert len({m["Message-ID"] for m in smtp.messages}) == 4
    rows = await _outbox(conn)
    assert {r["status"] for r in rows} == {"sent"} and all(r["sent_at"] for r in rows)
    alert = await conn.fetchrow("select * from alerts")
    assert alert["delivery_status"] == "sent" and alert["delivered_at"] is not None
    subjects = sorted(str(m["Subject"]) for m in smtp.messages)
    assert sum("OFFLINE" in s for s in subjects) == 1
    assert sum("complete" in s for s in subjects) == 3


async def test_two_replicas_delivering_at_once_send_each_notice_once(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, ca: ThrowawayCA,
        smtp: RefusingSink) -> None:
    await _completed_jobs(conn, 30)
    env = {**await db_env(dsn), **notify_env(ca, smtp)}
    async with Delivery(env) as a, Delivery(env) as b:
        await smtp.progress.wait_for(lambda: len(smtp.messages) >= 30)
        await a.until(lambda: a.count("soundcheck_poller_notices_sent_total", "email")
                      + b.count("soundcheck_poller_notices_sent_total", "email") == 30)
    assert len(smtp.messages) == 30
    assert len({m["Message-ID"] for m in smtp.messages}) == 30
    print(f"\ntwo deliverers: {a.count('soundcheck_poller_notices_sent_total', 'email'):.0f}"
          f" + {b.count('soundcheck_poller_notices_sent_total', 'email'):.0f} mails")


async def test_a_notice_fails_for_good_after_the_last_attempt(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, ca: ThrowawayCA,
        hook: WebhookSink) -> None:
    await _offline_job(conn)
    hook.status = 503
    env = {**await db_env(dsn), **notify_env(ca, hook=hook, NOTIFY_MAX_ATTEMPTS="3")}
    async with Delivery(env) as d:
        await d.until(lambda: d.count("soundcheck_poller_notices_given_up_total") == 1)
    [row] = await _outbox(conn)
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert "HTTP 503" in row["last_error"] and "token" not in row["last_error"]
    assert await conn.fetchval("select delivery_status from alerts") == "failed"
    assert hook.received == []


async def test_a_refused_recipient_is_not_retried(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, ca: ThrowawayCA,
        smtp: RefusingSink) -> None:
    await _completed_jobs(conn, 1, email="gone@example.com")
    smtp.refused.add("gone@example.com")
    async with Delivery({**await db_env(dsn), **notify_env(ca, smtp)}) as d:
        await d.until(lambda: d.count("soundcheck_poller_notices_given_up_total") == 1)
    [row] = await _outbox(conn)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "550" in row["last_error"]


async def test_a_channel_that_took_a_notice_does_not_get_it_again(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, ca: ThrowawayCA,
        smtp: RefusingSink, hook: WebhookSink) -> None:
    await _completed_jobs(conn, 1)
    hook.status = 503
    async with Delivery({**await db_env(dsn), **notify_env(ca, smtp, hook)}) as d:
        await d.until(lambda: d.count("soundcheck_poller_notice_failures_total", "webhook")
                      >= 2)
        hook.status = 200
        await d.until(lambda: d.count("soundcheck_poller_notices_sent_total", "webhook") == 1)
    assert len(smtp.messages) == 1 and len(hook.received) == 1
    [row] = await _outbox(conn)
    assert row["status"] == "sent" and row["done_channels"] == ["email", "webhook"]


# A real poller process: alerts raised from what it writes, notices it delivers ---------

@pytest.mark.slow
async def test_a_poller_raises_the_offline_alert_and_mails_the_completion(
        conn: asyncpg.Connection, dsn: str, db_env: DbEnv, ca: ThrowawayCA,
        smtp: RefusingSink, standin: LatencyStandIn) -> None:
    standin.behaviours["192.0.2.66"] = NO_REPLY  # a dead target: every ping missed
    [dead] = await add_jobs(conn, ["192.0.2.66"], cadence_seconds=1)
    [short] = await add_jobs(conn, ["127.0.0.66"], cadence_seconds=1, duration_minutes=1,
                             started_at=datetime.now(UTC) - timedelta(seconds=52))
    proc = PollerProcess({**await db_env(dsn), **notify_env(ca, smtp),
                          "LATENCY_API_URL": standin.url, "POLL_INTERVAL_MS": "500",
                          "BATCH_FLUSH_INTERVAL_MS": "200"})
    await proc.start()
    try:
        async with asyncio.timeout(30):
            await smtp.progress.wait_for(lambda: len(smtp.messages) >= 2)
        assert proc.proc is not None and proc.proc.returncode is None
        proc.terminate()
        assert await proc.wait() == 0
    finally:
        await proc.kill()
    subjects = sorted(str(m["Subject"]) for m in smtp.messages)
    assert subjects == ["[Sound Check] OFFLINE: 192.0.2.66 (account ACC-1)",
                        "[Sound Check] PASS: monitoring of 127.0.0.66 (account ACC-1) complete"]
    alert = await conn.fetchrow("select * from alerts")
    assert (alert["job_id"], alert["alert_type"], alert["delivery_status"]) == (
        dead, "offline", "sent")
    assert await conn.fetchval("select alert_state::text from jobs where id = $1",
                               dead) == "offline_alerted"
    # The alert came from the 5th missed sample the poller wrote.
    fifth = await conn.fetchval(
        "select recorded_at from samples where job_id = $1 order by sequence_number "
        "offset 4 limit 1", dead)
    assert alert["triggered_at"] == fifth
    assert await conn.fetchval("select status::text from jobs where id = $1",
                               short) == "completed"
    assert "notices email" in proc.log
    assert SMTP_PASSWORD not in proc.log


async def test_a_line_break_in_the_data_cannot_add_a_header(ca: ThrowawayCA,
                                                            smtp: RefusingSink) -> None:
    [channel] = make_channels(_settings(notify_env(ca, smtp)))
    n = _notice("offline")
    job = NoticeJob(n.job.id, "ACC-1\r\nBcc: victim@example.com", n.job.target,
                    n.job.notification_email, n.job.requester_name, 10, 60,
                    n.job.started_at, None)
    await channel.send(Notice(n.id, "offline", 1, job, triggered_at=n.triggered_at))
    [msg] = smtp.messages
    assert msg["Bcc"] is None and smtp.recipients == [["noc@example.com"]]
    assert msg["Subject"] == ("[Sound Check] OFFLINE: 192.0.2.44 (account ACC-1 Bcc: "
                              "victim@example.com)")


class _Broken:
    """A channel with a bug: it raises what no channel should."""

    name = "webhook"

    async def start(self) -> None:
        pass

    async def send(self, notice: Notice) -> None:
        raise ValueError("cannot build the message")

    async def close(self) -> None:
        pass


async def test_a_channel_bug_fails_the_notice_not_the_loop(
        conn: asyncpg.Connection, dsn: str) -> None:
    await _completed_jobs(conn, 2)
    settings = Settings.from_env({"DATABASE_URL": dsn, "NOTIFY_INTERVAL_MS": "100",
                                  "NOTIFY_MAX_ATTEMPTS": "5"})
    store = make_store(settings)
    await store.open()
    metrics = Metrics()
    deliverer = Deliverer(store, [_Broken()], settings, metrics)
    task = asyncio.create_task(deliverer.run())
    try:
        async with asyncio.timeout(20):
            await deliverer.progress.wait_for(
                lambda: metrics.value("soundcheck_poller_notices_given_up_total") == 2)
    finally:
        deliverer.stop()
        await task
        await store.close()
    rows = await _outbox(conn)
    # It would fail the same way again: no retries.
    assert [(r["status"], r["attempts"]) for r in rows] == [("failed", 1), ("failed", 1)]
    assert all("ValueError: cannot build the message" in r["last_error"] for r in rows)
