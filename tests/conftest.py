"""Fixtures: a real PostgreSQL server for the session, a fresh migrated database per test."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest

from poller.localpg import LocalPostgres, free_port
from poller.sidecar import serve
from tests.support.control_plane import ControlPlane, find_binaries
from tests.support.latency_standin import LatencyStandIn
from tests.support.postgrest_standin import PostgrestStandIn, make_jwt, migrate_like_supabase

os.environ.setdefault("POLLERFLEET_METRICS_PORT", "0")  # tests read the registry directly

TEMPLATE = "soundcheck_template"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
SERVICE_ROLE_KEY = make_jwt(JWT_SECRET, "service_role")
ANON_KEY = make_jwt(JWT_SECRET, "anon")
STANDIN_RTT_MS = 2.5
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    with LocalPostgres() as pg:
        asyncio.run(_make_template(pg))
        yield pg


async def _make_template(pg: LocalPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f"create database {TEMPLATE}")
    finally:
        await conn.close()
    # As on Supabase: its roles and default privileges exist before our migrations run.
    await migrate_like_supabase(_dsn(pg, TEMPLATE))


def _dsn(pg: LocalPostgres, db: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{pg.port}/{db}"


@pytest.fixture
async def fresh_db(pg_server: LocalPostgres) -> AsyncIterator[str]:
    """An empty database (no schema at all)."""
    name = f"t_{next(_counter)}"
    admin = await asyncpg.connect(pg_server.dsn)
    await admin.execute(f"create database {name}")
    try:
        yield _dsn(pg_server, name)
    finally:
        await admin.execute(f"drop database {name} with (force)")
        await admin.close()


@pytest.fixture
async def dsn(pg_server: LocalPostgres) -> AsyncIterator[str]:
    """A database with every migration applied (copied from a migrated template)."""
    name = f"m_{next(_counter)}"
    admin = await asyncpg.connect(pg_server.dsn)
    await admin.execute(f"create database {name} template {TEMPLATE}")
    try:
        yield _dsn(pg_server, name)
    finally:
        await admin.execute(f"drop database {name} with (force)")
        await admin.close()


@pytest.fixture
async def own_pg() -> AsyncIterator[LocalPostgres]:
    """A server of the test's own, which it may stop and start."""
    pg = LocalPostgres()
    await asyncio.to_thread(pg.start)
    await migrate_like_supabase(pg.dsn)
    yield pg
    await asyncio.to_thread(pg.destroy)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(dsn)
    try:
        yield c
    finally:
        await c.close()


DbEnv = Callable[[str], Awaitable[dict[str, str]]]


@pytest.fixture(params=["postgres", "supabase"])
async def db_env(request: pytest.FixtureRequest) -> AsyncIterator[DbEnv]:
    """Both transports, same test: maps a database URL to the poller's environment for it.

    `supabase` puts the RPC stand-in for PostgREST in front of that database.
    """
    standins: list[PostgrestStandIn] = []

    async def env_for(dsn: str) -> dict[str, str]:
        if request.param == "postgres":
            return {"DATABASE_URL": dsn}
        standin = PostgrestStandIn(dsn, JWT_SECRET)
        await standin.start()
        standins.append(standin)
        return {"SUPABASE_URL": standin.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY}

    yield env_for
    for standin in standins:
        await standin.stop()


@pytest.fixture
async def standin() -> AsyncIterator[LatencyStandIn]:
    """The scripted Latency API stand-in on loopback, answering every IP at once."""
    s = LatencyStandIn(rtt_ms=STANDIN_RTT_MS)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def sidecar() -> AsyncIterator[str]:
    """The latency sidecar (real ICMP, raw sockets) on a free loopback port; its URL."""
    if os.geteuid() != 0:
        pytest.skip("the sidecar's raw ICMP socket needs root here")
    port = free_port()
    stop, serving = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve("127.0.0.1", port, 2.0, "raw", 2000, stop,
                                     serving=serving))
    url = f"http://127.0.0.1:{port}"
    listening = asyncio.ensure_future(serving.wait())
    try:
        async with asyncio.timeout(10):  # it listens, or it failed to start (raised)
            await asyncio.wait([task, listening], return_when=asyncio.FIRST_COMPLETED)
    finally:
        listening.cancel()
    if task.done():
        task.result()  # raises what stopped it
    yield url
    stop.set()
    await task


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """A real kube-apiserver + controller-manager + etcd (tests/support/control_plane.py)."""
    binaries, why = find_binaries()
    if not binaries:
        pytest.skip(why)
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on the PATH")
    plane = ControlPlane(binaries)
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
