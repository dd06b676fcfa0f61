"""Applies pending sql/migrations in order, each in its own transaction, under an advisory lock."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Final

import asyncpg

from xray_ingest.db import Connection
from xray_ingest.errors import MigrationError
from xray_ingest.sql import QUERIES, Migration, list_migrations

logger = logging.getLogger(__name__)

# Any fixed 64-bit number: every migrator of every xray-ingest instance takes the same lock.
LOCK_KEY: Final = 0x5852_4159_4D49_4752  # "XRAYMIGR"


def plan(migrations: Sequence[Migration], applied: Iterable[asyncpg.Record]) -> list[Migration]:
    """Returns the migrations still to apply.

    Raises MigrationError when an applied migration's file is missing, renamed or changed.
    """
    on_disk = {migration.version: migration for migration in migrations}
    last_applied = 0
    for record in applied:
        version, name, checksum = record["version"], record["name"], record["checksum"]
        label = f"{version:04d}_{name}.sql"
        migration = on_disk.get(version)
        if migration is None or migration.name != name:
            raise MigrationError(f"migration {label} was applied but its file is missing")
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {label} was applied but its file has changed since; "
                "fix forward with a new migration instead of editing an applied one"
            )
        last_applied = max(last_applied, version)
    return [migration for migration in migrations if migration.version > last_applied]


async def _applied(connection: Connection) -> list[asyncpg.Record]:
    try:
        return await connection.fetch(QUERIES["applied_migrations"])
    except asyncpg.UndefinedTableError:
        return []


async def pending_migrations(connection: Connection) -> list[Migration]:
    """Returns the migrations not yet applied, without changing anything."""
    return plan(list_migrations(), await _applied(connection))


async def migrate(dsn: str) -> list[Migration]:
    """Applies every pending migration and returns them; a second run applies nothing."""
    migrations = list_migrations()
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(dsn)
    try:
        await connection.execute(QUERIES["lock_migrations"], LOCK_KEY)
        try:
            await connection.execute(QUERIES["create_schema_migrations"])
            pending = plan(migrations, await _applied(connection))
            for migration in pending:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        QUERIES["record_migration"],
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                logger.info(
                    "applied migration %04d_%s",
                    migration.version,
                    migration.name,
                    extra={"action": "migrate", "version": migration.version},
                )
        finally:
            await connection.execute(QUERIES["unlock_migrations"], LOCK_KEY)
    finally:
        await connection.close()
    if not pending:
        logger.info("database schema is up to date", extra={"action": "migrate"})
    return pending
