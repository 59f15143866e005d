"""Await a condition on a component's state instead of polling it.

Components call `notify()` after each step that changes what they report (a sync, a
batch write); `wait_for(predicate)` re-checks the predicate after each. Used by the tests
and by the demo's live view, so neither has to sleep and re-check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Progress:
    def __init__(self) -> None:
        self._step = asyncio.Event()

    def notify(self) -> None:
        step, self._step = self._step, asyncio.Event()
        step.set()

    async def next(self) -> None:
        """Wait for the next notification."""
        await self._step.wait()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._step.wait()
