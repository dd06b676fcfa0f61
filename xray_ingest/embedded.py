"""Runs the embedded PostgreSQL (the pgserver wheel) used when no database is configured."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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
    dsn: str = server.get_uri()
    logger.info("embedded PostgreSQL running with data in %s", pgdata, extra={"action": "embedded"})
    return server, dsn


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
