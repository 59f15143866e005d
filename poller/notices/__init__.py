"""Delivery of alerts and completion notices: one module per channel behind one small
interface, chosen from a registry (`CHANNELS`), and the loop that claims notices from the
outbox and hands them to the channels (`delivery.py`).

A channel's `send` either returns (the notice was accepted) or raises `DeliveryError`,
saying whether trying again could help.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..models import Notice
from ..settings import Settings


class DeliveryError(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent  # the same notice would fail again: no retries


class Channel(Protocol):
    name: str

    async def start(self) -> None: ...

    async def send(self, notice: Notice) -> None: ...

    async def close(self) -> None: ...


def _email(settings: Settings) -> Channel:
    from .email import EmailChannel
    return EmailChannel(settings)


def _webhook(settings: Settings) -> Channel:
    from .webhook import WebhookChannel
    return WebhookChannel(settings)


CHANNELS: dict[str, Callable[[Settings], Channel]] = {"email": _email, "webhook": _webhook}


def make_channels(settings: Settings) -> list[Channel]:
    """The channels the settings configure, in a fixed order (none: delivery is off)."""
    return [CHANNELS[name](settings) for name in settings.notify_channels]
