"""Test databases: one migrated template per run, cloned for each test, on a real PostgreSQL.

The server is XRAY_TEST_DSN or DATABASE_URL; with neither, a throwaway embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from xray_ingest import db
from xray_ingest.embedded import start_embedded_postgres
from xray_ingest.migrate import migrate


def with_database(dsn: str, name: str) -> str:
    """The same server DSN, pointing at database `name`."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    dsn = os.environ.get("XRAY_TEST_DSN") or os.environ.get("DATABASE_URL")
    if dsn:
        yield dsn
        return
    with tempfile.TemporaryDirectory(prefix="xray-test-") as folder:
        server, embedded_dsn = start_embedded_postgres(Path(folder) / "pgdata", throwaway=True)
        try:
            yield embedded_dsn
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def template_database(server_dsn: str) -> Iterator[str]:
    """A database migrated once per run by the real migrator; tests clone it."""
    name = f"xray_test_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_dsn, f"CREATE DATABASE {name}"))
    asyncio.run(migrate(with_database(server_dsn, name)))
    yield name
    asyncio.run(_admin(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def database_dsn(server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"xray_t_{uuid.uuid4().hex[:12]}"
    await _admin(server_dsn, f"CREATE DATABASE {name} TEMPLATE {template_database}")
    try:
        yield with_database(server_dsn, name)
    finally:
        await _admin(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def empty_database_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all, dropped afterwards."""
    name = f"xray_e_{uuid.uuid4().hex[:12]}"
    await _admin(server_dsn, f"CREATE DATABASE {name}")
    try:
        yield with_database(server_dsn, name)
    finally:
        await _admin(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def pool(database_dsn: str) -> AsyncIterator[db.Pool]:
    pool = await db.create_pool(database_dsn, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()
