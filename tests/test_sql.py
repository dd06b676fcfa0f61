"""The query loader and the migration list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xray_ingest.errors import MigrationError
from xray_ingest.sql import QUERIES, SQL_DIR, list_migrations, load_queries

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "xray_ingest"


def test_every_query_file_is_loaded_by_its_stem() -> None:
    stems = {path.stem for path in (SQL_DIR / "queries").glob("*.sql")}
    assert set(QUERIES) == stems
    assert "fetch_trace_events" in QUERIES


def test_every_query_is_used_by_the_code_and_every_used_query_exists() -> None:
    source = "\n".join(path.read_text() for path in PACKAGE_DIR.glob("*.py"))
    used = set(re.findall(r'QUERIES\["([a-z0-9_]+)"\]', source))
    assert used == set(QUERIES)


def test_every_sql_file_starts_with_a_comment_line() -> None:
    for path in SQL_DIR.rglob("*.sql"):
        assert path.read_text().startswith("-- "), path.name


def test_query_parameters_are_each_documented_in_the_header() -> None:
    for name, text in QUERIES.items():
        header = {int(n) for n in re.findall(r"^-- \$(\d+) ", text, flags=re.M)}
        body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        used = {int(n) for n in re.findall(r"\$(\d+)", body)}
        assert header == used, name


def test_load_queries_maps_stems_to_text(tmp_path: Path) -> None:
    (tmp_path / "one.sql").write_text("-- one\nSELECT 1;\n")
    assert dict(load_queries(tmp_path)) == {"one": "-- one\nSELECT 1;\n"}


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [migration.version for migration in list_migrations()]
    assert versions == list(range(1, len(versions) + 1))


@pytest.mark.parametrize(
    "names",
    [
        ["0001_a.sql", "0003_c.sql"],
        ["0001_a.sql", "0001_b.sql"],
        ["0002_b.sql"],
        ["0001_a.sql", "2_b.sql"],
        ["0001_Bad-Name.sql"],
    ],
)
def test_gap_duplicate_or_misnamed_migration_stops_with_a_clear_error(
    tmp_path: Path, names: list[str]
) -> None:
    for name in names:
        (tmp_path / name).write_text("-- x\nSELECT 1;\n")
    with pytest.raises(MigrationError):
        list_migrations(tmp_path)
