"""A webhook: one JSON POST per notice (aiohttp), with an Idempotency-Key header derived
from the notice so a receiver can drop a repeat. 2xx is delivered; 4xx other than 408 and
429 will not change on retry."""

from __future__ import annotations

import aiohttp

from ..models import Notice
from ..settings import Settings
from . import DeliveryError
from .render import webhook_payload


class WebhookChannel:
    name = "webhook"

    def __init__(self, settings: Settings) -> None:
        assert settings.notify_webhook_url is not None
        self._url = settings.notify_webhook_url.get_secret_value()
        self._base = settings.notify_app_base_url
        self._timeout = aiohttp.ClientTimeout(total=settings.notify_timeout_ms / 1000)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def send(self, notice: Notice) -> None:
        assert self._session is not None, "start() was not called"
        try:
            async with self._session.post(
                    self._url, json=webhook_payload(notice, self._base),
                    headers={"Idempotency-Key": f"soundcheck-notice-{notice.id}"},
                    allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return
                # The URL is a secret (it often holds a token): never in the message.
                raise DeliveryError(f"the webhook answered HTTP {resp.status}",
                                    permanent=400 <= resp.status < 500
                                    and resp.status not in (408, 429))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"the webhook is unreachable ({type(exc).__name__})") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
