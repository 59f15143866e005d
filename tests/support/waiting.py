"""Waiting on a system that cannot notify the test (a database table, an API object): probe it
until the condition holds, a bounded number of times."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(probe: Callable[[], Awaitable[bool]], *, timeout: float,
                     interval: float = 0.1, what: str = "condition") -> None:
    """Await `probe()` every `interval` seconds until it is true; TimeoutError after
    `timeout` seconds, naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():
        if loop.time() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(interval)
