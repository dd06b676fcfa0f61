"""Command line: `xray-ingest serve|migrate` (also `python -m xray_ingest`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from xray_ingest.config import Settings, load_settings
from xray_ingest.embedded import start_embedded_postgres
from xray_ingest.errors import XrayError
from xray_ingest.logconfig import configure_logging
from xray_ingest.migrate import migrate


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-ingest", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate if embedded, then serve HTTP")
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.port)
    serve.add_argument("--workers", type=int, default=settings.workers)
    commands.add_parser("migrate", help="apply pending migrations")
    return parser


def _database(settings: Settings) -> tuple[Any, str]:
    """The configured DSN, or the embedded PostgreSQL's (started now) when none is set."""
    if settings.database_url is not None:
        return None, settings.database_url
    server, dsn = start_embedded_postgres(settings.data_dir / "pgdata")
    # uvicorn's worker processes build their settings from the environment.
    os.environ["DATABASE_URL"] = dsn
    return server, dsn


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except XrayError as exc:
        print(f"xray-ingest: {exc}", file=sys.stderr)
        return 2
    args = _parser(settings).parse_args(argv)
    configure_logging(settings.log_level)
    try:
        _server, dsn = _database(settings)
        if args.command == "migrate" or settings.database_url is None:
            asyncio.run(migrate(dsn))
    except XrayError as exc:
        print(f"xray-ingest: {exc}", file=sys.stderr)
        return 1
    if args.command == "serve":
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the
        # previous handlers back. These turn it into a normal exit, so atexit handlers run
        # (they stop the embedded PostgreSQL) and Ctrl-C prints no traceback.
        signal.signal(signal.SIGINT, _exit_quietly)
        signal.signal(signal.SIGTERM, _exit_quietly)
        uvicorn.run(
            "xray_ingest.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http="httptools",
            access_log=False,
            # No proxy in front by default; forwarded headers would cost every request.
            proxy_headers=False,
            log_level=settings.log_level.lower(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
