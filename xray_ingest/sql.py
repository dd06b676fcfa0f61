"""Finds the sql/ folder, loads every named query once, and lists the migrations in order."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from xray_ingest.errors import MigrationError

_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


def find_sql_dir() -> Path:
    """Returns sql/: inside the installed package, or at the top of a checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "sql", package_dir.parent / "sql"):
        if (candidate / "queries").is_dir():
            return candidate
    raise FileNotFoundError(f"no sql/queries folder beside {package_dir}")


SQL_DIR: Final = find_sql_dir()


def load_queries(queries_dir: Path) -> MappingProxyType[str, str]:
    """Maps each `<name>.sql` file's stem to its text."""
    return MappingProxyType(
        {path.stem: path.read_text(encoding="utf-8") for path in sorted(queries_dir.glob("*.sql"))}
    )


QUERIES: Final = load_queries(SQL_DIR / "queries")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def list_migrations(migrations_dir: Path = SQL_DIR / "migrations") -> list[Migration]:
    """Returns the migrations in version order.

    Raises MigrationError for a misnamed file, a duplicate version or a gap in the numbering.
    """
    migrations: list[Migration] = []
    for path in sorted(migrations_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_snake_case.sql")
        migrations.append(
            Migration(int(match["version"]), match["name"], path.read_text(encoding="utf-8"))
        )
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration numbering must run 1, 2, 3, ... without gaps or duplicates: "
                f"expected {expected:04d}, found {migration.version:04d}_{migration.name}.sql"
            )
    return migrations
