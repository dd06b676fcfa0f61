"""The connection pool, COPY of event rows, and thin typed functions over the named queries."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from msgspec import Raw

from xray_ingest.errors import RejectedRowsError
from xray_ingest.models import Row
from xray_ingest.sql import QUERIES

logger = logging.getLogger(__name__)

COPY_COLUMNS: Final = (
    "id",
    "event_type",
    "trace_id",
    "span_id",
    "parent_span_id",
    "service",
    "timestamp",
    "duration_ms",
    "data",
)
# SQLSTATE classes that mean "the database refuses this data", as opposed to "try again later":
# 22 data exception, 23 integrity constraint violation, 54 program limit exceeded.
_REJECTION_CLASSES: Final = frozenset({"22", "23", "54"})
# jsonb's binary wire format is a version byte followed by the JSON text.
_JSONB_VERSION: Final = b"\x01"

# Strings: asyncpg's classes are generic only to the type checker.
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


def _encode_jsonb(data: bytes | Raw) -> bytes:
    return _JSONB_VERSION + data


def _decode_jsonb(data: bytes) -> Raw:
    return Raw(data[1:])


async def init_connection(connection: Connection) -> None:
    """Makes jsonb travel as raw JSON bytes both ways: no decode and re-encode in Python."""
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )


async def create_pool(dsn: str, max_size: int) -> Pool:
    """Opens a pool that connects lazily, so the server starts (degraded) while the database is
    away and reconnects by itself when it is back."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=max_size, init=init_connection)
    assert pool is not None
    return pool


def _is_rejection(exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in _REJECTION_CLASSES


def _trace_starts(rows: Sequence[Row]) -> tuple[list[uuid.UUID], list[datetime]]:
    starts: dict[uuid.UUID, datetime] = {}
    for row in rows:
        trace_id, timestamp = row[2], row[6]
        known = starts.get(trace_id)
        if known is None or timestamp < known:
            starts[trace_id] = timestamp
    trace_ids = sorted(starts)
    return trace_ids, [starts[trace_id] for trace_id in trace_ids]


async def _copy_new_events(connection: Connection, rows: Sequence[Row]) -> None:
    await connection.copy_records_to_table("events", records=rows, columns=COPY_COLUMNS)


async def _copy_skipping_stored(connection: Connection, rows: Sequence[Row]) -> int:
    await connection.execute(QUERIES["create_events_staging"])
    await connection.copy_records_to_table("events_staging", records=rows, columns=COPY_COLUMNS)
    status = await connection.execute(QUERIES["insert_staged_events"])
    return int(status.rsplit(" ", 1)[-1])


async def _store(connection: Connection, rows: Sequence[Row], skip_stored: bool) -> int:
    async with connection.transaction():
        if skip_stored:
            stored = await _copy_skipping_stored(connection, rows)
        else:
            await _copy_new_events(connection, rows)
            stored = len(rows)
        await connection.execute(QUERIES["upsert_trace_starts"], *_trace_starts(rows))
    return stored


async def copy_events(pool: Pool, rows: Sequence[Row], *, skip_stored: bool = False) -> int:
    """Stores rows in one transaction and returns how many were new.

    The fast path COPYs straight into events; only when that hits a stored (trace_id, span_id,
    timestamp), or with skip_stored, does it go through a staging table that skips the
    repeats. Raises
    RejectedRowsError when the database refuses the data itself (so some row is poison);
    connection and server errors propagate unchanged, to be retried.
    """
    async with pool.acquire() as connection:
        try:
            try:
                return await _store(connection, rows, skip_stored)
            except asyncpg.UniqueViolationError:
                return await _store(connection, rows, skip_stored=True)
        except asyncpg.PostgresError as exc:
            if _is_rejection(exc):
                raise RejectedRowsError(f"{type(exc).__name__}: {exc}") from exc
            raise


async def store_dead_letter(pool: Pool, row: Row, error: str) -> None:
    """Keeps a row the database refused, with the reason, in dead_letter_events."""
    payload = bytes(row[8]).decode("utf-8", "backslashreplace")
    async with pool.acquire() as connection:
        await connection.execute(QUERIES["insert_dead_letter"], payload, error)


class PoolSink:
    """The flusher's view of the database: store a batch, keep a refused row."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def copy_events(self, rows: Sequence[Row]) -> int:
        return await copy_events(self._pool, rows)

    async def store_dead_letter(self, row: Row, error: str) -> None:
        await store_dead_letter(self._pool, row, error)


async def ping(pool: Pool, timeout_s: float) -> datetime | None:
    """Returns the database's clock, or None when it does not answer within timeout_s."""
    try:
        async with pool.acquire(timeout=timeout_s) as connection:
            value: datetime = await connection.fetchval(QUERIES["ping"], timeout=timeout_s)
            return value
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None


async def fetch_trace_events(pool: Pool, trace_id: uuid.UUID) -> list[Raw]:
    async with pool.acquire() as connection:
        records = await connection.fetch(QUERIES["fetch_trace_events"], trace_id)
    return [record[0] for record in records]


async def fetch_event(pool: Pool, span_id: uuid.UUID) -> Raw | None:
    async with pool.acquire() as connection:
        data: Raw | None = await connection.fetchval(QUERIES["fetch_event"], span_id)
        return data


async def fetch_traces_page(
    pool: Pool, after_start_time: datetime, after_trace_id: uuid.UUID, page_size: int
) -> list[asyncpg.Record]:
    """Returns up to page_size trace summaries that sort after the cursor, newest first."""
    args: tuple[Any, ...] = (after_start_time, after_trace_id, page_size)
    async with pool.acquire() as connection:
        return await connection.fetch(QUERIES["fetch_traces_page"], *args)
