"""Command line: `xray-ingest serve|migrate|keys` (also `python -m xray_ingest`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from xray_ingest import balance, keys
from xray_ingest.config import Settings, load_settings
from xray_ingest.embedded import start_embedded_postgres
from xray_ingest.errors import XrayError
from xray_ingest.logconfig import configure_logging, logging_config
from xray_ingest.migrate import migrate
from xray_ingest.workers import fresh_folder_for_workers


def uvicorn_options(settings: Settings, host: str, port: int, workers: int) -> dict[str, Any]:
    """How `serve` runs uvicorn, apart from the app (benchmarks.floor_app runs its bare app so)."""
    return {
        "host": host,
        "port": port,
        "workers": workers,
        # uvloop, accepting connections so that the workers hold even shares (balance.py).
        "loop": "xray_ingest.balance:BalancedLoop",
        # httptools, with each response sent in one write (see protocol.py).
        "http": "xray_ingest.protocol:HttpProtocol",
        "access_log": False,
        "log_config": logging_config(settings.log_level, settings.log_format),
        # No proxy in front by default; forwarded headers would cost every request.
        "proxy_headers": False,
        # No `server: uvicorn` header: it tells a client what to attack, and formatting and
        # checking it cost each single-event POST 4.5k of its 386k instructions.
        "server_header": False,
    }


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-ingest", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate if embedded, then serve HTTP")
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.port)
    serve.add_argument("--workers", type=int, default=settings.workers)
    commands.add_parser("migrate", help="apply pending migrations")
    keys.add_commands(commands)
    return parser


def _database(settings: Settings) -> tuple[Any, str]:
    """The configured DSN, or the embedded PostgreSQL's (started now) when none is set."""
    if settings.database_url is not None:
        return None, settings.database_url
    server, dsn = start_embedded_postgres(settings.data_dir / "pgdata")
    # uvicorn's worker processes build their settings from the environment.
    os.environ["DATABASE_URL"] = dsn
    return server, dsn


def _share_metrics_between_workers(settings: Settings, workers: int) -> None:
    """Several workers keep their metrics in files under PROMETHEUS_MULTIPROC_DIR, which
    prometheus-client reads at import: so it is set here, before the workers start, to a fresh
    folder removed at exit (stale files from an earlier run would add up wrongly)."""
    if workers > 1 and settings.metrics_dir is None:
        fresh_folder_for_workers("PROMETHEUS_MULTIPROC_DIR", "xray-metrics-")


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except XrayError as exc:
        print(f"xray-ingest: {exc}", file=sys.stderr)
        return 2
    args = _parser(settings).parse_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        _server, dsn = _database(settings)
        if args.command == "migrate" or settings.database_url is None:
            asyncio.run(migrate(dsn))
        if args.command == "keys":
            return asyncio.run(keys.run(dsn, args))
    except XrayError as exc:
        print(f"xray-ingest: {exc}", file=sys.stderr)
        return 1
    if args.command == "serve":
        # Each worker builds its settings from the environment: the same worker count gives
        # each the same share of the queue bounds (checked here, before any worker starts).
        os.environ["XRAY_WORKERS"] = str(args.workers)
        try:
            settings = load_settings()
        except XrayError as exc:
            print(f"xray-ingest: {exc}", file=sys.stderr)
            return 2
        _share_metrics_between_workers(settings, args.workers)
        balance.share_connections_between(args.workers)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the
        # previous handlers back. These turn it into a normal exit, so atexit handlers run
        # (they stop the embedded PostgreSQL) and Ctrl-C prints no traceback.
        signal.signal(signal.SIGINT, _exit_quietly)
        signal.signal(signal.SIGTERM, _exit_quietly)
        uvicorn.run(
            "xray_ingest.app:create_app",
            factory=True,
            **uvicorn_options(settings, args.host, args.port, args.workers),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
