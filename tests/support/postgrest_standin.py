"""A small RPC-only stand-in for PostgREST (Supabase's REST layer) on the real test Postgres.

No PostgREST binary exists for these machines. This serves only what the poller uses:
`POST /rest/v1/rpc/<fn>` with a JSON object of named arguments, called the way PostgREST
calls it (`fn(a := x.a, …) FROM json_to_record($1) AS x(a <type>, …)`), the JSON result as
the body. Checked like Supabase's gateway: `apikey` and `Authorization: Bearer` must both
carry the key, else 401. Errors are shaped like PostgREST's, `{code, message, details,
hint}`, with its HTTP statuses (404 PGRST202 for an unknown function, 503 when the
database is unreachable, 400/403/409/500 by SQLSTATE class).

Not served (limits named in the README): tables and views, GET RPCs, filters, Prefer
headers, JWT roles and claims (every call runs as the database owner), schema switching,
overloaded functions, unnamed arguments.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from aiohttp import web

from poller.progress import Progress

_ARGS_SQL = """
select p.proname, p.proretset, p.prorettype::regtype::text as rettype,
       coalesce(p.proargnames, '{}') as names,
       coalesce(p.proargmodes::text[], '{}') as modes,
       array(select format_type(t, null) from unnest(p.proargtypes) as t) as types
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = 'public' and p.proname = $1
"""


def _error(status: int, code: str, message: str, details: str | None = None,
           hint: str | None = None) -> web.Response:
    return web.json_response(
        {"code": code, "message": message, "details": details, "hint": hint}, status=status)


def _status_for(sqlstate: str) -> int:
    """PostgREST's mapping of SQLSTATE to HTTP status, for the classes that occur here."""
    if sqlstate == "42883":
        return 404
    if sqlstate == "42501":
        return 403
    if sqlstate == "23505" or sqlstate.startswith("23"):
        return 409
    if sqlstate.startswith(("08", "53", "57P")):
        return 503
    if sqlstate.startswith(("22", "P0", "42")):
        return 400
    return 500


class PostgrestStandIn:
    def __init__(self, dsn: str, key: str) -> None:
        self.dsn = dsn
        self.key = key
        self.calls: list[str] = []  # function names, in order
        self.progress = Progress()
        self.port = 0
        self._pool: asyncpg.Pool | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=8, timeout=5,
                                               command_timeout=30)
        app = web.Application()
        app.router.add_post("/rest/v1/rpc/{fn}", self._rpc)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._pool is not None:
            self._pool.terminate()

    def _authorised(self, request: web.Request) -> bool:
        return (request.headers.get("apikey") == self.key
                and request.headers.get("Authorization") == f"Bearer {self.key}")

    async def _rpc(self, request: web.Request) -> web.Response:
        fn = request.match_info["fn"]
        self.calls.append(fn)
        self.progress.notify()
        if not self._authorised(request):
            return _error(401, "PGRST301", "Invalid API key",
                          hint="Double check your Supabase `anon` or `service_role` API key.")
        try:
            args = await request.json() if request.can_read_body else {}
        except ValueError:
            return _error(400, "PGRST102", "Empty or invalid json")
        if not isinstance(args, dict):
            return _error(400, "PGRST102", "Arguments must be a JSON object")
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                return await self._call(conn, fn, args)
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate or "XX000"
            return _error(_status_for(state), state, str(exc),
                          getattr(exc, "detail", None), getattr(exc, "hint", None))
        except (OSError, asyncpg.InterfaceError, TimeoutError):
            return _error(503, "PGRST001", "Database client error. Retrying the connection.")

    async def _call(self, conn: asyncpg.Connection, fn: str, args: dict[str, Any]
                    ) -> web.Response:
        rows = await conn.fetch(_ARGS_SQL, fn)
        match = [r for r in rows if set(args) <= set(_inputs(r))]
        if len(match) != 1:
            return _error(
                404, "PGRST202",
                f"Could not find the function public.{fn}({', '.join(sorted(args))}) "
                "in the schema cache",
                hint="Perhaps you need to apply the migrations.")
        proc = match[0]
        types = _inputs(proc)
        call = f'public."{fn}"(' + ", ".join(f'"{a}" := x."{a}"' for a in args) + ")"
        if args:
            cols = ", ".join(f'"{a}" {types[a]}' for a in args)
            source = f"json_to_record($1::json) as x({cols}), "
            params: tuple[str, ...] = (json.dumps(args),)
        else:
            source, params = "", ()
        if proc["proretset"]:
            sql = f"select coalesce(json_agg(f), '[]'::json) from {source}{call} as f"
        else:
            sql = f"select to_json({call}) from {source}(select 1) as one"
        result = await conn.fetchval(sql, *params)
        return web.Response(text=result if result is not None else "null",
                            content_type="application/json")


def _inputs(proc: asyncpg.Record) -> dict[str, str]:
    """Input argument name → type of a pg_proc row."""
    names, modes, types = list(proc["names"]), list(proc["modes"]), list(proc["types"])
    if not modes:
        modes = ["i"] * len(types)
    inputs = [n for n, m in zip(names, modes, strict=False) if m in ("i", "b", "v")]
    return dict(zip(inputs, types, strict=False))
