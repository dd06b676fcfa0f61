"""Rows packed by copyformat (through db.copy_rows) land exactly as asyncpg's own COPY encoding
stores them."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta, timezone

from msgspec import Raw

from xray_ingest import copyformat, db
from xray_ingest.models import INT4_MAX, Row

# Every copied column, the payload as jsonb's text.
STORED_COLUMNS = ", ".join(f'"{name}"' for name in db.COPY_COLUMNS if name != "data")


def edge_rows() -> list[Row]:
    """Rows at the edges of each field: NULLs, extreme and zoned timestamps, long and
    non-ASCII text, payloads as bytes and as Raw; more of them than one CopyData chunk holds."""
    parent = uuid.uuid4()
    timestamps = [
        datetime(2024, 1, 3, 10, 30, 5, 123456, tzinfo=UTC),
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        # One microsecond inside Python's range: asyncpg writes its very ends as -infinity
        # and infinity (the next test).
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
        datetime(2024, 6, 1, 12, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2024, 6, 1, 12, tzinfo=timezone(timedelta(hours=-8))),
    ]
    services = [None, "", "checkout", "s\u00e9rvice \u2603 \U0001f600", "x" * 255]
    event_types = ["llm_call", "decision", "\u00e9v\u00e9nement", "e" * 50]
    durations = [None, 0, 1, INT4_MAX]
    rows: list[Row] = []
    for index in range(3 * copyformat.CHUNK_ROWS + 7):
        span_id = uuid.uuid4()
        payload = f'{{"n":{index},"text":"caf\u00e9 \\"quoted\\" \\\\ \\u0041"}}'.encode()
        rows.append(
            (
                span_id,
                event_types[index % len(event_types)],
                uuid.uuid4(),
                span_id,
                parent if index % 3 else None,
                services[index % len(services)],
                timestamps[index % len(timestamps)],
                durations[index % len(durations)],
                Raw(payload) if index % 2 else payload,
            )
        )
    return rows


async def test_packed_rows_store_what_asyncpg_records_store(pool: db.Pool) -> None:
    rows = edge_rows()
    async with pool.acquire() as connection:
        await connection.execute(
            "CREATE TEMPORARY TABLE reference (LIKE events INCLUDING DEFAULTS)"
        )
        await connection.copy_records_to_table("reference", records=rows, columns=db.COPY_COLUMNS)
        await db.copy_rows(connection, "events", rows)
        query = f"SELECT {STORED_COLUMNS}, data::text FROM {{}} ORDER BY span_id"
        packed = await connection.fetch(query.format("events"))
        reference = await connection.fetch(query.format("reference"))
    assert len(packed) == len(rows)
    assert [tuple(record) for record in packed] == [tuple(record) for record in reference]


async def test_the_ends_of_pythons_datetime_range_are_stored_as_themselves(
    pool: db.Pool,
) -> None:
    first, last = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    rows = [
        (*row[:6], start, *row[7:])
        for row, start in zip(edge_rows()[:2], (first, last), strict=True)
    ]
    async with pool.acquire() as connection:
        await db.copy_rows(connection, "events", rows)
        stored = await connection.fetch('SELECT "timestamp"::text FROM events ORDER BY 1')
    assert [record[0] for record in stored] == [
        "0001-01-01 00:00:00+00",
        "9999-12-31 23:59:59.999999+00",
    ]


async def test_an_empty_batch_copies_nothing(pool: db.Pool) -> None:
    async with pool.acquire() as connection:
        status = await db.copy_rows(connection, "events", [])
    assert status == "COPY 0"


async def test_other_tasks_run_between_the_chunks_of_a_flush() -> None:
    rows = edge_rows()  # more than three chunks
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    seen: list[int] = []
    async for _ in copyformat.copy_data(rows):
        seen.append(turns)
    counter.cancel()
    assert len(seen) == 4
    assert all(later > earlier for earlier, later in itertools.pairwise(seen))
