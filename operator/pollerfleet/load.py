"""The fleet's state (load, topology, heartbeats), read and published through the same
SQL API and transports as the pollers.

The operator's database credentials come from its own environment, with the pollers'
variable names (DATABASE_URL, or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY, DB_TIMEOUT_MS).
One store per operator process, opened on first use in the operator's event loop.
"""

from __future__ import annotations

import os

from poller.settings import ConfigError, Settings
from poller.store import (
    OPERATOR_API_VERSION,
    FleetState,
    OperatorStore,
    OutboxState,
    StoreMisconfigured,
    check_api_version,
    make_store,
)

_VARS = ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "DB_TIMEOUT_MS",
         "DATABASE_PREPARED_STATEMENTS")

_store: OperatorStore | None = None


async def _opened() -> OperatorStore:
    global _store
    if _store is None:
        try:
            settings = Settings.from_env({k: os.environ[k] for k in _VARS if k in os.environ})
        except ConfigError as exc:
            raise StoreMisconfigured(f"operator database settings: {exc}") from None
        store = make_store(settings)
        await store.open()
        try:
            check_api_version(await store.api_version(), OPERATOR_API_VERSION)
        except BaseException:
            await store.close()
            raise
        _store = store
    return _store


async def fleet_state(fleet: str) -> FleetState:
    return await (await _opened()).fleet_state(fleet)


async def publish_topology(fleet: str, counts: tuple[int, ...]) -> int:
    return await (await _opened()).publish_topology(fleet, counts)


async def set_failover(fleet: str, failover_s: int) -> None:
    await (await _opened()).set_failover(fleet, failover_s)


async def outbox_state() -> OutboxState:
    return await (await _opened()).outbox_state()


async def close() -> None:
    global _store
    if _store is not None:
        store, _store = _store, None
        await store.close()
