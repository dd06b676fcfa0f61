"""The migrator against a real database: fresh, repeated, concurrent and tampered runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from xray_ingest import migrate as migrate_module
from xray_ingest.errors import MigrationError
from xray_ingest.migrate import migrate, pending_migrations
from xray_ingest.sql import list_migrations


async def _recorded(dsn: str) -> list[tuple[int, str]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
        return [(row["version"], row["name"]) for row in rows]
    finally:
        await connection.close()


async def test_fresh_database_gets_every_migration_recorded(empty_database_dsn: str) -> None:
    applied = await migrate(empty_database_dsn)
    expected = [(m.version, m.name) for m in list_migrations()]
    assert [(m.version, m.name) for m in applied] == expected
    assert await _recorded(empty_database_dsn) == expected
    connection = await asyncpg.connect(empty_database_dsn)
    try:
        assert await pending_migrations(connection) == []
        assert await connection.fetchval("SELECT count(*) FROM events") == 0
    finally:
        await connection.close()


async def test_second_run_applies_nothing(empty_database_dsn: str) -> None:
    await migrate(empty_database_dsn)
    before = await _recorded(empty_database_dsn)
    assert await migrate(empty_database_dsn) == []
    assert await _recorded(empty_database_dsn) == before


async def test_concurrent_migrators_apply_each_migration_once(empty_database_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_dsn) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, len(list_migrations())]
    assert len(await _recorded(empty_database_dsn)) == len(list_migrations())


async def test_unmigrated_database_reports_every_migration_pending(
    empty_database_dsn: str,
) -> None:
    connection = await asyncpg.connect(empty_database_dsn)
    try:
        assert len(await pending_migrations(connection)) == len(list_migrations())
    finally:
        await connection.close()


def _copy_migrations(target: Path) -> None:
    for migration in list_migrations():
        (target / f"{migration.version:04d}_{migration.name}.sql").write_text(migration.sql)


async def test_changed_applied_migration_is_reported(
    empty_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(empty_database_dsn)
    _copy_migrations(tmp_path)
    first = sorted(tmp_path.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    monkeypatch.setattr(migrate_module, "list_migrations", lambda: list_migrations(tmp_path))
    with pytest.raises(MigrationError, match="has changed"):
        await migrate(empty_database_dsn)


async def test_missing_applied_migration_is_reported(
    empty_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(empty_database_dsn)
    _copy_migrations(tmp_path)
    sorted(tmp_path.glob("*.sql"))[-1].unlink()
    monkeypatch.setattr(migrate_module, "list_migrations", lambda: list_migrations(tmp_path))
    with pytest.raises(MigrationError, match="is missing"):
        await migrate(empty_database_dsn)


async def test_new_migration_file_is_applied_on_the_next_run(
    empty_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(empty_database_dsn)
    _copy_migrations(tmp_path)
    version = len(list_migrations()) + 1
    (tmp_path / f"{version:04d}_add_note.sql").write_text(
        "-- Adds a note column.\nALTER TABLE events ADD COLUMN note text;\n"
    )
    monkeypatch.setattr(migrate_module, "list_migrations", lambda: list_migrations(tmp_path))
    applied = await migrate(empty_database_dsn)
    assert [m.name for m in applied] == ["add_note"]


async def test_failing_migration_leaves_nothing_behind(
    empty_database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(empty_database_dsn)
    _copy_migrations(tmp_path)
    version = len(list_migrations()) + 1
    (tmp_path / f"{version:04d}_broken.sql").write_text(
        "-- Half works.\nCREATE TABLE half (id int);\nSELECT no_such_function();\n"
    )
    monkeypatch.setattr(migrate_module, "list_migrations", lambda: list_migrations(tmp_path))
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(empty_database_dsn)
    connection = await asyncpg.connect(empty_database_dsn)
    try:
        assert await connection.fetchval("SELECT to_regclass('half')") is None
    finally:
        await connection.close()
    assert len(await _recorded(empty_database_dsn)) == version - 1


async def test_server_is_a_supported_postgresql(empty_database_dsn: str) -> None:
    connection = await asyncpg.connect(empty_database_dsn)
    try:
        assert int(await connection.fetchval("SHOW server_version_num")) >= 140000
    finally:
        await connection.close()
