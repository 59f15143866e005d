"""Latency sidecar: a SpreeDB-Latency-API-compatible HTTP server backed by in-process ICMP.

    python -m poller.sidecar [--host 127.0.0.1] [--port 4402] [--health-port 4403]

Routes (what the poller's Latency API client speaks):
- `GET /latency/<group>/<ip>/` → `{elapsed, error, expected, ip, poller}`: `elapsed` is the
  RTT in ms (0 when there was no reply), `error` null or a text the poller classifies
  (timeouts say "timeout", unreachable hosts "unreachable"), `expected` is always true (the
  sidecar has no inventory), `poller` is this host's name;
- `POST /ping {"ip": …}` → `{success, rtt_ms, error}`;
- `GET /health` → `{status, sockets}`.
A bad IP, or one in a denied network (`TARGET_DENY`, the poller's setting and default),
gets HTTP 400 with `{"error": …}` and is never pinged.

It pings whatever it is asked and checks no caller, so it listens on loopback by default:
in a poller pod only the poller (same network namespace) can reach it. The kubelet probes
the pod's IP, not loopback, so `--health-port` serves `/health` alone on all addresses.
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
from .pingers import PingResult, ping
from .pingers.icmp import IcmpPinger, IcmpUnavailable, SocketKind
from .targets import DEFAULT_DENY, TargetPolicy, parse_networks

log = logging.getLogger("poller.sidecar")


def make_app(pinger: IcmpPinger, max_in_flight: int, policy: TargetPolicy | None = None
             ) -> web.Application:
    slots = asyncio.Semaphore(max_in_flight)
    host = socket.gethostname()
    policy = policy or TargetPolicy()

    async def probe(ip: str) -> PingResult:
        async with slots:
            return await ping(pinger, ip)

    def bad_ip(ip: Any, why: str | None) -> web.Response:
        return web.json_response({"error": f"invalid IP address: {ip!r}: {why}"}, status=400)

    async def latency(request: web.Request) -> web.Response:
        ip, why = policy.check(request.match_info["ip"])
        if ip is None:
            return bad_ip(request.match_info["ip"], why)
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
        ip, why = policy.check(raw) if isinstance(raw, str) else (None, "not a string")
        if ip is None:
            return bad_ip(raw, why)
        result = await probe(ip)
        ok = result.status is SampleStatus.SUCCESS
        return web.json_response({"success": ok, "rtt_ms": result.rtt_ms if ok else None,
                                  "error": None if ok else result.detail})

    app = web.Application()
    app.router.add_get("/latency/{group}/{ip}/", latency)
    app.router.add_get("/latency/{group}/{ip}", latency)
    app.router.add_post("/ping", ping_route)
    app.router.add_get("/health", _health(pinger))
    return app


def _health(pinger: IcmpPinger) -> Any:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sockets": {
            f"ipv{v}": kind for v, kind in pinger.socket_kinds.items()}})
    return health


async def serve(host: str, port: int, timeout_s: float, socket_kind: SocketKind,
                max_in_flight: int, stop: asyncio.Event, *, health_port: int | None = None,
                policy: TargetPolicy | None = None, serving: asyncio.Event | None = None
                ) -> None:
    """Serve until `stop` is set; `serving` (if given) is set once every port listens."""
    pinger = IcmpPinger(timeout_s, socket_kind)
    await pinger.start()
    runners = [web.AppRunner(make_app(pinger, max_in_flight, policy), access_log=None,
                             shutdown_timeout=timeout_s)]
    if health_port is not None:
        health_app = web.Application()
        health_app.router.add_get("/health", _health(pinger))
        runners.append(web.AppRunner(health_app, access_log=None, shutdown_timeout=0.5))
    try:
        for runner, (h, p) in zip(runners, [(host, port), ("0.0.0.0", health_port)],
                                  strict=False):
            await runner.setup()
            await web.TCPSite(runner, h, p).start()
        log.info("latency sidecar on %s:%d, health on %s (ICMP sockets: %s)", host, port,
                 health_port or port, pinger.socket_kinds)
        if serving is not None:
            serving.set()
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await pinger.close()


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m poller.sidecar", description=__doc__)
    parser.add_argument("--host", default=env.get("SIDECAR_HOST", "127.0.0.1"),
                        help="address of the ping API (default: loopback only)")
    parser.add_argument("--port", type=int, default=int(env.get("SIDECAR_PORT", "4402")))
    parser.add_argument("--health-port", type=int, default=None,
                        help="also serve /health (only) on all addresses, for the kubelet")
    parser.add_argument("--timeout-ms", type=int, default=int(env.get("PING_TIMEOUT_MS", "2000")))
    parser.add_argument("--socket", choices=["auto", "dgram", "raw"],
                        default=env.get("ICMP_SOCKET", "auto"))
    parser.add_argument("--max-in-flight", type=int,
                        default=int(env.get("SIDECAR_MAX_IN_FLIGHT", "1000")))
    args = parser.parse_args(argv)
    try:
        policy = TargetPolicy(parse_networks(env.get("TARGET_DENY") or ",".join(DEFAULT_DENY)))
    except ValueError as exc:
        print(f"sidecar: TARGET_DENY: {exc}", file=sys.stderr)
        return 2
    logs.configure(env.get("LOG_FORMAT", "text"), env.get("LOG_LEVEL", "INFO"))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, args.timeout_ms / 1000, args.socket,
                    args.max_in_flight, stop, health_port=args.health_port, policy=policy)

    try:
        asyncio.run(run())
    except IcmpUnavailable as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
