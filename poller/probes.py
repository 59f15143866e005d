"""HTTP endpoints on PORT: /health (liveness), /ready (readiness), /metrics (Prometheus).

Thin: each handler renders what the service reports. Bodies never carry a secret: the
service's texts come from store errors, which never include the DSN or key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .service import Service


def make_app(service: Service) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        ok, body = service.health()
        return web.json_response(body, status=200 if ok else 503)

    async def ready(_: web.Request) -> web.Response:
        ok, body = service.readiness()
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=service.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
