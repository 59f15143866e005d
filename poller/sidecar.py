"""Latency sidecar: a SpreeDB-Latency-API-compatible HTTP server backed by in-process ICMP.

    python -m poller.sidecar [--port 4402]

Routes (what the poller's Latency API client speaks):
- `GET /latency/<group>/<ip>/` → `{elapsed, error, expected, ip, poller}`: `elapsed` is the
  RTT in ms (0 when there was no reply), `error` null or a text the poller classifies
  (timeouts say "timeout", unreachable hosts "unreachable"), `expected` is always true (the
  sidecar has no inventory), `poller` is this host's name;
- `POST /ping {"ip": …}` → `{success, rtt_ms, error}`;
- `GET /health` → `{status, sockets}`.
A bad IP gets HTTP 400 with `{"error": …}` and is never pinged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from aiohttp import web

from . import logs
from .models import SampleStatus
from .pingers import PingResult, ping, valid_ip
from .pingers.icmp import IcmpPinger, IcmpUnavailable

log = logging.getLogger("poller.sidecar")


def make_app(pinger: IcmpPinger, max_in_flight: int) -> web.Application:
    slots = asyncio.Semaphore(max_in_flight)
    host = socket.gethostname()

    async def probe(ip: str) -> PingResult:
        async with slots:
            return await ping(pinger, ip)

    def bad_ip(ip: Any) -> web.Response:
        return web.json_response({"error": f"invalid IP address: {ip!r}"}, status=400)

    async def latency(request: web.Request) -> web.Response:
        ip = valid_ip(request.match_info["ip"])
        if ip is None:
            return bad_ip(request.match_info["ip"])
        result = await probe(ip)
        ok = result.status is SampleStatus.SUCCESS
        return web.json_response({
            "elapsed": result.rtt_ms if ok else 0,
            "error": None if ok else result.detail,
            "expected": True,
            "ip": ip,
            "poller": host,
        })

    async def ping_route(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON: {\"ip\": \"…\"}"}, status=400)
        raw = body.get("ip") if isinstance(body, dict) else None
        ip = valid_ip(raw) if isinstance(raw, str) else None
        if ip is None:
            return bad_ip(raw)
        result = await probe(ip)
        ok = result.status is SampleStatus.SUCCESS
        return web.json_response({"success": ok, "rtt_ms": result.rtt_ms if ok else None,
                                  "error": None if ok else result.detail})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sockets": {
            f"ipv{v}": kind for v, kind in pinger.socket_kinds.items()}})

    app = web.Application()
    app.router.add_get("/latency/{group}/{ip}/", latency)
    app.router.add_get("/latency/{group}/{ip}", latency)
    app.router.add_post("/ping", ping_route)
    app.router.add_get("/health", health)
    return app


async def serve(host: str, port: int, timeout_s: float, socket_kind: str,
                max_in_flight: int, stop: asyncio.Event) -> None:
    pinger = IcmpPinger(timeout_s, socket_kind)  # type: ignore[arg-type]
    await pinger.start()
    runner = web.AppRunner(make_app(pinger, max_in_flight), access_log=None,
                           shutdown_timeout=timeout_s)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("latency sidecar on %s:%d (ICMP sockets: %s)", host, port, pinger.socket_kinds)
        await stop.wait()
    finally:
        await runner.cleanup()
        await pinger.close()


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m poller.sidecar", description=__doc__)
    parser.add_argument("--host", default=env.get("SIDECAR_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env.get("SIDECAR_PORT", "4402")))
    parser.add_argument("--timeout-ms", type=int, default=int(env.get("PING_TIMEOUT_MS", "2000")))
    parser.add_argument("--socket", choices=["auto", "dgram", "raw"],
                        default=env.get("ICMP_SOCKET", "auto"))
    parser.add_argument("--max-in-flight", type=int,
                        default=int(env.get("SIDECAR_MAX_IN_FLIGHT", "1000")))
    args = parser.parse_args(argv)
    logs.configure(env.get("LOG_FORMAT", "text"), env.get("LOG_LEVEL", "INFO"))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, args.timeout_ms / 1000, args.socket,
                    args.max_in_flight, stop)

    try:
        asyncio.run(run())
    except IcmpUnavailable as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
