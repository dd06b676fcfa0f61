"""Test databases: one migrated template per run, cloned for each test, on a real PostgreSQL.

The server is XRAY_TEST_DSN or DATABASE_URL; with neither, a throwaway embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from benchmarks.common import execute, with_database
from tests.processes import Server
from xray_ingest import db
from xray_ingest.embedded import postgres_or_throwaway
from xray_ingest.migrate import migrate


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    configured = os.environ.get("XRAY_TEST_DSN") or os.environ.get("DATABASE_URL")
    with postgres_or_throwaway(configured) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def template_database(server_dsn: str) -> Iterator[str]:
    """A database migrated once per run by the real migrator; tests clone it."""
    name = f"xray_test_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(execute(server_dsn, f"CREATE DATABASE {name}"))
    asyncio.run(migrate(with_database(server_dsn, name)))
    yield name
    asyncio.run(execute(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.asynccontextmanager
async def scratch_database(server_dsn: str, template: str = "template1") -> AsyncIterator[str]:
    """A new database cloned from template, dropped on exit; yields its DSN."""
    name = f"xray_t_{uuid.uuid4().hex[:12]}"
    await execute(server_dsn, f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield with_database(server_dsn, name)
    finally:
        await execute(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def database_dsn(server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    async with scratch_database(server_dsn, template_database) as dsn:
        yield dsn


@pytest.fixture
async def empty_database_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    async with scratch_database(server_dsn) as dsn:
        yield dsn


@pytest.fixture
async def pool(database_dsn: str) -> AsyncIterator[db.Pool]:
    pool = await db.create_pool(database_dsn, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(autouse=True)
def kill_leftover_servers() -> Iterator[None]:
    """A test that fails halfway must not leave its server process running."""
    yield
    while Server.started:
        server = Server.started.pop()
        server.kill()
        server.output(timeout_s=10)
