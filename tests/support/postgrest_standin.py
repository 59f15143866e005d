"""A small RPC-only stand-in for PostgREST (Supabase's REST layer) on the real test Postgres.

No PostgREST binary exists for these machines. This serves only what the poller uses:
`POST /rest/v1/rpc/<fn>` with a JSON object of named arguments, called the way PostgREST
calls it (`fn(a := x.a, …) FROM json_to_record($1) AS x(a <type>, …)`), the JSON result as
the body. As strict as Supabase on what the project relies on:
- keys are HS256 JWTs signed with the project's secret; `apikey` and `Authorization:
  Bearer` must both be valid, else 401;
- every call runs in a transaction as the JWT's `role` claim (`SET LOCAL ROLE`), so grants
  and row level security apply as they do on Supabase (`prepare_database` creates anon,
  authenticated and service_role with BYPASSRLS, and Supabase's default privileges, which
  grant every new table, function and sequence in `public` to all three);
- a set-returning function's result is cut at `max_rows` (db-max-rows, 1,000 on Supabase),
  silently and in no particular order; a scalar result (json, jsonb) is one row;
- errors are shaped like PostgREST's, `{code, message, details, hint}`, with its HTTP
  statuses (404 PGRST202 for an unknown function, 401/403 for a refused privilege, 503
  when the database is unreachable, 400/409/500 by SQLSTATE class).

Not served (limits named in the README): tables and views, GET RPCs, filters, Prefer
headers, JWT expiry and other claims, schema switching, overloaded functions, unnamed
arguments.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import asyncpg
from aiohttp import web

from poller.migrate import migrate
from poller.progress import Progress

_ARGS_SQL = """
select p.proname, p.proretset, p.prorettype::regtype::text as rettype,
       coalesce(p.proargnames, '{}') as names,
       coalesce(p.proargmodes::text[], '{}') as modes,
       array(select format_type(t, null) from unnest(p.proargtypes) as t) as types
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = 'public' and p.proname = $1
"""


# What Supabase sets up before any migration of ours runs (cluster roles are shared by all
# databases of the test server, hence the checks).
SUPABASE_SETUP_SQL = """
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then
        create role anon nologin noinherit;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin noinherit;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then
        create role service_role nologin noinherit bypassrls;
    end if;
end
$$;
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public
    grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public
    grant all on sequences to anon, authenticated, service_role;
"""
ROLES = ("anon", "authenticated", "service_role")


async def prepare_database(conn: asyncpg.Connection) -> None:
    """Give a database Supabase's roles and default privileges (before migrating it)."""
    await conn.execute(SUPABASE_SETUP_SQL)


async def migrate_like_supabase(dsn: str) -> None:
    """Supabase's roles and default privileges first, then every migration."""
    conn = await asyncpg.connect(dsn)
    try:
        await prepare_database(conn)
    finally:
        await conn.close()
    await migrate(dsn)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(secret: str, role: str) -> str:
    """A Supabase-style key: an HS256 JWT whose `role` claim PostgREST runs the call as."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": "supabase", "role": role}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def jwt_role(secret: str, token: str) -> str | None:
    """The role of a validly signed token, else None."""
    try:
        head, body, sig = token.split(".")
        want = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(_b64(want), sig):
            return None
        role = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["role"]
    except (ValueError, KeyError, TypeError):
        return None
    return role if role in ROLES else None


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
    def __init__(self, dsn: str, jwt_secret: str, max_rows: int | None = 1000) -> None:
        self.dsn = dsn
        self.jwt_secret = jwt_secret
        self.max_rows = max_rows
        self.calls: list[str] = []  # function names, in order
        self.roles: list[str] = []  # the role each call ran as
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
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._pool is not None:
            self._pool.terminate()

    def key(self, role: str) -> str:
        return make_jwt(self.jwt_secret, role)

    def _role(self, request: web.Request) -> str | None:
        """The Bearer token's role, when both it and the apikey are valid keys."""
        if jwt_role(self.jwt_secret, request.headers.get("apikey", "")) is None:
            return None
        auth = request.headers.get("Authorization", "")
        return jwt_role(self.jwt_secret, auth[7:]) if auth.startswith("Bearer ") else None

    async def _rpc(self, request: web.Request) -> web.Response:
        fn = request.match_info["fn"]
        self.calls.append(fn)
        self.progress.notify()
        role = self._role(request)
        if role is None:
            return _error(401, "PGRST301", "Invalid API key",
                          hint="Double check your Supabase `anon` or `service_role` API key.")
        self.roles.append(role)
        try:
            args = await request.json() if request.can_read_body else {}
        except ValueError:
            return _error(400, "PGRST102", "Empty or invalid json")
        if not isinstance(args, dict):
            return _error(400, "PGRST102", "Arguments must be a JSON object")
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(f"set local role {role}")  # one of ROLES, checked above
                return await self._call(conn, fn, args)
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate or "XX000"
            status = _status_for(state)
            if status == 403 and role == "anon":
                status = 401  # PostgREST: a refused privilege is 401 for the anonymous role
            return _error(status, state, str(exc),
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
            # db-max-rows: PostgREST's LIMIT, with no order of its own.
            limit = f" limit {int(self.max_rows)}" if self.max_rows is not None else ""
            sql = (f"select coalesce(json_agg(f), '[]'::json) from "
                   f"(select * from {source}{call} as f{limit}) as f")
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
