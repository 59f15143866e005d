"""A scripted stand-in for the SpreeDB Latency API, for error cases and benchmarks.

It speaks both routes (`GET /latency/<group>/<ip>/`, `POST /ping`) and answers each IP
as scripted: the real API (and our ICMP sidecar) cannot be made to return HTTP 500, hang
or send garbage on demand. Counts requests per IP so tests can assert what was asked.

Run alone (for benchmarks): `python -m tests.support.latency_standin --port 4402`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
from collections import Counter
from typing import Any

from aiohttp import web

from poller.progress import Progress

# behaviour name → what the latency route answers
SUCCESS = "success"
TIMEOUT_TEXT = "timeout_text"
UNREACHABLE = "unreachable"
NO_REPLY = "no_reply"
HOST_DOWN = "host_down"
OTHER_ERROR = "other_error"
ZERO_ELAPSED = "zero_elapsed"
HTTP_500 = "http_500"
HANG = "hang"
GARBAGE = "garbage"
# Hostile answers: what a broken or compromised API (or a proxy in front of it) can send.
INVALID_UTF8 = "invalid_utf8"
DEEP_JSON = "deep_json"  # nested past Python's recursion limit
HUGE_NUMBER = "huge_number"  # {"elapsed": 1e308}: a float, but no column holds it
INFINITE_NUMBER = "infinite_number"  # 1e999 parses as inf
HUGE_BODY = "huge_body"  # 8 MB of valid JSON
TRUNCATED = "truncated"  # Content-Length promises more than is sent
RESET = "reset"  # the connection is reset instead of answered
HOSTILE = (INVALID_UTF8, DEEP_JSON, HUGE_NUMBER, INFINITE_NUMBER, HUGE_BODY, TRUNCATED, RESET)

_ERRORS = {
    TIMEOUT_TEXT: "Request Timeout for icmp_seq 0",
    UNREACHABLE: "Destination Host Unreachable",
    NO_REPLY: "no reply from target",
    HOST_DOWN: "sendto: host down",
    OTHER_ERROR: "ping: permission denied (are you root?)",
}


class LatencyStandIn:
    def __init__(self, rtt_ms: float = 1.25, default: str = SUCCESS) -> None:
        self.rtt_ms = rtt_ms
        self.default = default
        self.behaviours: dict[str, str] = {}
        self.requests: Counter[str] = Counter()
        self.progress = Progress()  # notified on every request
        self.delay_s = 0.0  # answer every request this much later
        self.active = 0
        self.max_active = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._hang = asyncio.Event()  # never set: a hang lasts until the client gives up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answer(self, ip: str) -> tuple[int, str, dict[str, Any] | None]:
        """(HTTP status, behaviour, latency-route body)."""
        self.requests[ip] += 1
        self.progress.notify()
        how = self.behaviours.get(ip, self.default)
        if how == HTTP_500:
            return 500, how, None
        if how in _ERRORS:
            return 200, how, {"elapsed": 0, "error": _ERRORS[how], "expected": True, "ip": ip,
                              "poller": "standin"}
        elapsed = 0 if how == ZERO_ELAPSED else self.rtt_ms
        return 200, how, {"elapsed": elapsed, "error": None, "expected": True, "ip": ip,
                          "poller": "standin"}

    async def _respond(self, request: web.Request, ip: str, body_of: type | None = None
                       ) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return await self._respond_now(request, ip, body_of)
        finally:
            self.active -= 1

    async def _respond_now(self, request: web.Request, ip: str, body_of: type | None
                           ) -> web.StreamResponse:
        status, how, body = self._answer(ip)
        if how == HANG:
            await self._hang.wait()
        if how == GARBAGE:
            return web.Response(text="<html>not json", content_type="text/html")
        if how in HOSTILE:
            return await _hostile(request, how)
        if body is None:
            return web.Response(status=status, text="internal error")
        if body_of is not None:  # POST /ping shape
            body = {"success": body["error"] is None and body["elapsed"] > 0,
                    "rtt_ms": body["elapsed"] or None, "error": body["error"]}
        return web.json_response(body, status=status)

    async def latency(self, request: web.Request) -> web.StreamResponse:
        return await self._respond(request, request.match_info["ip"])

    async def ping(self, request: web.Request) -> web.StreamResponse:
        try:
            ip = (await request.json())["ip"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "body must be {\"ip\": ...}"}, status=400)
        return await self._respond(request, str(ip), body_of=dict)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/latency/{group}/{ip}/", self.latency)
        app.router.add_post("/ping", self.ping)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _hostile(request: web.Request, how: str) -> web.StreamResponse:
    json_body = {
        INVALID_UTF8: b'{"elapsed": 1.0, "error": "\xff\xfe bad"}',
        DEEP_JSON: b'{"elapsed": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        # Both routes' shapes in one body.
        HUGE_NUMBER: b'{"elapsed": 1e308, "success": true, "rtt_ms": 1e308, "error": null}',
        INFINITE_NUMBER: b'{"elapsed": 1e999, "success": true, "rtt_ms": 1e999, "error": null}',
        HUGE_BODY: b'{"elapsed": 1.0, "pad": "' + b"x" * (8 << 20) + b'"}',
    }
    if how in json_body:
        return web.Response(body=json_body[how], content_type="application/json")
    transport = request.transport
    assert transport is not None
    if how == TRUNCATED:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"elapsed": 1.')
        transport.close()
        return resp
    # RESET: SO_LINGER 0 makes close() send a TCP RST.
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()
    raise ConnectionResetError


async def _main(port: int) -> None:
    standin = LatencyStandIn()
    await standin.start(port)
    print(json.dumps({"url": standin.url}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4402)
    asyncio.run(_main(parser.parse_args().port))
