"""The embedded PostgreSQL: started, configured for an events table, stopped with its owner."""

from __future__ import annotations

import tempfile
from pathlib import Path

import asyncpg

from xray_ingest.embedded import EMBEDDED_SETTINGS, start_embedded_postgres


async def test_embedded_server_runs_with_the_settings_an_events_table_needs() -> None:
    with tempfile.TemporaryDirectory(prefix="xray-emb-") as folder:
        server, dsn = start_embedded_postgres(Path(folder) / "pgdata", throwaway=True)
        try:
            connection = await asyncpg.connect(dsn)
            try:
                for name, value in EMBEDDED_SETTINGS.items():
                    assert await connection.fetchval(f"SHOW {name}") == value
            finally:
                await connection.close()
            # A second start on the same data finds the settings in force and keeps them.
            again, _ = start_embedded_postgres(Path(folder) / "pgdata", throwaway=True)
            assert again is server
        finally:
            server.cleanup()
