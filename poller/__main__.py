"""`python -m poller [run|migrate|demo]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import threading

from . import logs
from .settings import SECRET_VARS, ConfigError, Settings

EXIT_CONFIG = 2
_OVERRUN_S = 3.0


def _run() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"poller: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    secrets = [os.environ[v] for v in SECRET_VARS if os.environ.get(v)]
    logs.configure(settings.log_format, settings.log_level, secrets)
    # The poller allocates few reference cycles, but the cyclic collector's passes over tens
    # of thousands of job, heap and sample objects stalled the event loop for 10+ ms and
    # were the p99 lateness (bench/bench_icmp.py: p99 12 ms → 2.3 ms at 5,000 pings/s).
    # Collect far less often; reference counting still frees everything acyclic at once.
    gc.set_threshold(100_000, 50, 100)
    from .pingers.icmp import IcmpUnavailable
    from .service import Service

    async def main() -> int:
        return await Service(settings).run(on_stop=_exit_after)

    try:
        return asyncio.run(main())
    except IcmpUnavailable as exc:
        print(f"poller: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _exit_after(grace_s: float) -> None:
    """The stop bounds every step by the grace; should one still hang (a client library
    blocking the event loop), end the process a little after it rather than wait for the
    kubelet's SIGKILL with no word in the logs."""

    def hard_exit() -> None:
        logging.getLogger("poller").error(
            "stop overran its grace of %.1fs by %.0fs: exiting now", grace_s, _OVERRUN_S)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(grace_s + _OVERRUN_S, hard_exit)
    timer.daemon = True
    timer.start()


def _migrate(database_url: str | None) -> int:
    from .migrate import MigrationError, migrate

    dsn = database_url or os.environ.get("DATABASE_URL")
    if not dsn:
        print("poller migrate: DATABASE_URL: required (or pass --database-url)", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure("text", "INFO", [dsn])
    log = logging.getLogger("poller.migrate")
    try:
        report = asyncio.run(migrate(dsn))
    except MigrationError as exc:
        log.error("%s", exc)
        return 1
    except (OSError, TimeoutError) as exc:
        log.error("cannot reach the database: %s", exc.__class__.__name__)
        return 1
    for name, applied in report:
        log.info("%s: %s", name, "applied" if applied else "already applied")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poller", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the poller (default); configured by environment variables")
    mig = sub.add_parser("migrate", help="apply the SQL migrations (idempotent)")
    mig.add_argument("--database-url", help="Postgres URL; default: $DATABASE_URL")
    demo = sub.add_parser("demo", help="run everything locally on a throwaway database")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--unreachable", default="100::1",
                      help="the demo's unreachable target (default: 100::1, in the IPv6 "
                           "discard-only prefix of RFC 6666, which nothing answers)")
    demo.add_argument("--stop-database-after", type=float, default=None, metavar="S",
                      help="stop the demo's database after S seconds, to watch the poller "
                           "buffer and (with Prometheus installed) the write alert")
    args = parser.parse_args(argv)
    if args.command == "migrate":
        return _migrate(args.database_url)
    if args.command == "demo":
        from .demo import run_demo

        logs.configure("text", "WARNING")
        return run_demo(args.duration, args.unreachable, args.stop_database_after)
    return _run()


if __name__ == "__main__":
    sys.exit(main())
