"""Runs the embedded PostgreSQL (the pgserver wheel) used when no database is configured."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

# PostgreSQL's defaults suit a tiny server: once the events indexes (random UUID keys) outgrow
# 128 MB of buffers, COPY slows down badly and checkpoints come often. Measured with raw COPY at
# 3M stored rows: 0.66 x the empty-table rate with the defaults, 0.91 x with these. The embedded
# server is ours to configure; a server of the user's keeps its own settings.
EMBEDDED_SETTINGS: Final = {"shared_buffers": "1GB", "max_wal_size": "4GB"}


def start_embedded_postgres(pgdata: Path, *, throwaway: bool = False) -> tuple[Any, str]:
    """Starts (or reuses) the PostgreSQL whose data lives in pgdata and returns (server, dsn).

    The server stops when this process exits; with throwaway=True its data is deleted too.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless here.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="delete" if throwaway else "stop")
    _apply_settings(server)
    dsn: str = server.get_uri()
    logger.info("embedded PostgreSQL running with data in %s", pgdata, extra={"action": "embedded"})
    return server, dsn


def _apply_settings(server: Any) -> None:
    """Sets EMBEDDED_SETTINGS with ALTER SYSTEM and restarts the server once when they are not
    in force yet (a new data folder, or one made by an older version)."""
    shown = server.psql("SHOW shared_buffers;")
    if f" {EMBEDDED_SETTINGS['shared_buffers']}\n" in shown:
        return
    for name, value in EMBEDDED_SETTINGS.items():
        server.psql(f"ALTER SYSTEM SET {name} = '{value}';")
    # shared_buffers takes a restart. pgserver has no restart call of its own, so stop with its
    # pg_ctl wrapper and let it start the server again with the same socket options.
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    server.ensure_postgres_running()
    logger.info("embedded PostgreSQL configured: %s", EMBEDDED_SETTINGS)


@contextlib.contextmanager
def postgres_or_throwaway(dsn: str | None) -> Iterator[str]:
    """Yields dsn when given; else starts a throwaway embedded PostgreSQL, deleted on exit."""
    if dsn:
        yield dsn
        return
    # Short and under the temp dir: the server's socket path must stay under ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="xray-pg-") as folder:
        server, throwaway_dsn = start_embedded_postgres(Path(folder) / "pgdata", throwaway=True)
        try:
            yield throwaway_dsn
        finally:
            server.cleanup()
