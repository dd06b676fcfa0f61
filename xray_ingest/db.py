"""The connection pool, COPY of event rows, and thin typed functions over the named queries."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy
from msgspec import Raw

from xray_ingest import copyformat
from xray_ingest.errors import RejectedRowsError
from xray_ingest.models import AnalyticsWindow, Row, TraceFilters
from xray_ingest.sql import QUERIES

logger = logging.getLogger(__name__)

# The events columns in Row order: how asyncpg's copy_records_to_table takes rows (the
# benchmark's raw COPY ceiling does). The server packs rows itself (copyformat.COLUMNS).
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
# A metadata tag on at most this many events counts as rare (see fetch_traces_page).
RARE_TAG_EVENTS: Final = 5_000
# What a query raises when the database did not answer it: unreachable, timed out, or failed.
# InternalClientError is what asyncpg raises for a query sent on a connection whose session the
# server has just ended (a restart, pg_terminate_backend) while asyncpg is between reading the
# server's last message and noticing the closed socket.
UNANSWERED: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# jsonb's binary wire format is a version byte followed by the JSON text.
_JSONB_VERSION: Final = b"\x01"
# What a connection over a Unix socket may have in the kernel, sent but not yet read by the
# database (see widen_send_buffer); the kernel caps it at net.core.wmem_max.
SEND_BUFFER_BYTES: Final = 4 * 1024 * 1024

# Strings: asyncpg's classes are generic only to the type checker.
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


def _encode_jsonb(data: bytes | Raw) -> bytes:
    return _JSONB_VERSION + data


def _decode_jsonb(data: bytes) -> Raw:
    return Raw(data[1:])


def widen_send_buffer(sock: Any) -> None:
    """Lets a Unix socket hold SEND_BUFFER_BYTES on its way to the database, so a COPY goes on
    while the worker's event loop is busy decoding a batch.

    Over a Unix socket (the embedded PostgreSQL) the kernel holds only net.core.wmem_default,
    208 KB by default: about 3 ms of COPY, less than decoding one batch of 1000 events, so the
    backend waited for data (ClientRead) about as often as it worked. TCP sizes its buffer itself.
    """
    if sock.family != socket.AF_UNIX:
        return
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER_BYTES:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def init_connection(connection: Connection) -> None:
    """Makes jsonb and json travel as raw JSON bytes both ways: no decode and re-encode in
    Python (json's binary wire format is its text; jsonb's adds a version byte); widens the
    socket's send buffer (widen_send_buffer)."""
    # asyncpg offers no public way to the socket; its (private) transport has it.
    transport = getattr(connection, "_transport", None)
    if transport is not None:
        widen_send_buffer(transport.get_extra_info("socket"))
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )
    await connection.set_type_codec(
        "json", schema="pg_catalog", encoder=bytes, decoder=Raw, format="binary"
    )


async def _keep_session(connection: Connection) -> None:
    """What a connection returned to the pool needs undone: nothing. Our queries set no session
    state (no SET, LISTEN, cursor or advisory lock; the migrator has its own connection), and
    asyncpg still rolls back an open transaction first. Its default reset query instead costs
    every flush and every read one more round trip (RESET ALL, UNLISTEN *, CLOSE ALL, ...)."""


async def create_pool(dsn: str, max_size: int) -> Pool:
    """Opens a pool that connects lazily, so the server starts (degraded) while the database is
    away and reconnects by itself when it is back."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        init=init_connection,
        reset=_keep_session,
        # Times that the database itself renders (inside JSON documents) come out in UTC.
        server_settings={
            "timezone": "UTC",
            # Plan each query for its parameters: a filter on a rare value and on a common one
            # want different plans, and a cached generic plan would serve one of them badly.
            "plan_cache_mode": "force_custom_plan",
        },
    )
    assert pool is not None
    return pool


def _is_rejection(exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in _REJECTION_CLASSES


async def copy_rows(
    connection: Connection,
    table: str,
    rows: Sequence[Row],
    spans: copyformat.TraceSpans | None = None,
) -> str:
    """COPYs rows into table (events or a table like it) as copyformat packs them, noting their
    trace spans in `spans` when given; returns the command status ("COPY n"). No transaction of
    its own, and no traces upsert."""
    source = copyformat.copy_data(rows, spans)
    status: str = await connection.copy_to_table(
        table, source=source, columns=copyformat.COLUMNS, format="binary"
    )
    return status


async def _copy_skipping_stored(
    connection: Connection, rows: Sequence[Row], spans: copyformat.TraceSpans
) -> int:
    await connection.execute(QUERIES["create_events_staging"])
    await copy_rows(connection, "events_staging", rows, spans)
    status = await connection.execute(QUERIES["insert_staged_events"])
    return int(status.rsplit(" ", 1)[-1])


async def _store(connection: Connection, rows: Sequence[Row], skip_stored: bool) -> int:
    spans: copyformat.TraceSpans = {}
    async with connection.transaction():
        if skip_stored:
            stored = await _copy_skipping_stored(connection, rows, spans)
        else:
            await copy_rows(connection, "events", rows, spans)
            stored = len(rows)
        await connection.execute(QUERIES["upsert_traces"], *copyformat.span_columns(spans))
    return stored


async def copy_events(pool: Pool, rows: Sequence[Row], *, skip_stored: bool = False) -> int:
    """Stores rows in one transaction and returns how many were new.

    The fast path COPYs straight into events; only when that hits a stored (trace_id, span_id,
    timestamp), or with skip_stored, does it go through a staging table that skips the
    repeats. Raises
    RejectedRowsError when the database refuses the data itself, or when a row cannot be packed
    for it (either way some row is poison); connection and server errors propagate unchanged,
    to be retried.
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
        except copyformat.UNPACKABLE as exc:
            # A row that got past validation but cannot be packed (a value out of its field's
            # range or of the wrong type), or whose trace span leaves datetime's range: retrying
            # would fail the same way forever, and jam the queue.
            raise RejectedRowsError(f"{type(exc).__name__}: {exc}") from exc


def dead_letter_text(data: object) -> str:
    """A refused row's payload as text the database can store: the JSON as sent, with bytes
    that are no UTF-8 as backslash escapes; the repr of a value that is no bytes (only a bug
    makes one); NUL characters, which text cannot hold, as `\\x00`."""
    if isinstance(data, (bytes, Raw)):
        text = bytes(data).decode("utf-8", "backslashreplace")
    else:
        text = repr(data)
    return text.replace("\x00", "\\x00")


async def store_dead_letter(pool: Pool, row: Row, error: str) -> None:
    """Keeps a row the database refused, with the reason, in dead_letter_events."""
    payload = dead_letter_text(row[8])
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
    except UNANSWERED:
        return None


async def fetch_trace_events(pool: Pool, trace_id: uuid.UUID) -> list[asyncpg.Record]:
    """The trace's (span_id, parent_span_id, data) in time order; empty for an unknown trace."""
    async with pool.acquire() as connection:
        return await connection.fetch(QUERIES["fetch_trace_events"], trace_id)


async def fetch_event(pool: Pool, span_id: uuid.UUID) -> Raw | None:
    async with pool.acquire() as connection:
        data: Raw | None = await connection.fetchval(QUERIES["fetch_event"], span_id)
        return data


async def fetch_trace_summary(pool: Pool, trace_id: uuid.UUID) -> asyncpg.Record | None:
    async with pool.acquire() as connection:
        return await connection.fetchrow(QUERIES["fetch_trace_summary"], trace_id)


def _first_tag_documents(filters: TraceFilters) -> tuple[bytes, bytes]:
    """The first metadata filter as jsonb containment documents: its value as a string, and
    as the JSON scalar it spells when it spells one (so `tier=3` also finds `"tier": 3`)."""
    key, value = filters.metadata_keys[0], filters.metadata_values[0]
    as_text = msgspec.json.encode({key: value})
    try:
        scalar = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return as_text, as_text
    if isinstance(scalar, (list, dict, str)):
        return as_text, as_text
    return as_text, msgspec.json.encode({key: scalar})


async def fetch_traces_page(
    pool: Pool,
    after_start_time: datetime,
    after_trace_id: uuid.UUID,
    page_size: int,
    filters: TraceFilters,
) -> list[asyncpg.Record]:
    """Returns up to page_size trace summaries that sort after the cursor and pass the
    filters, newest first.

    The page walks traces newest first, probing each; a rare metadata tag would make that walk
    long, so the traces carrying the first tag are looked up first through the GIN index, and
    when they are few the walk visits only them."""
    args = (
        after_start_time,
        after_trace_id,
        page_size,
        filters.service,
        filters.event_type,
        filters.since,
        filters.until,
        filters.metadata_keys,
        filters.metadata_values,
        filters.min_duration_ms,
        filters.has_error,
    )
    async with pool.acquire() as connection:
        if filters.metadata_keys:
            tagged = await connection.fetch(
                QUERIES["fetch_tagged_trace_ids"],
                *_first_tag_documents(filters),
                RARE_TAG_EVENTS + 1,
            )
            if len(tagged) <= RARE_TAG_EVENTS:
                candidates = list({record[0] for record in tagged})
                return await connection.fetch(QUERIES["fetch_traces_page_among"], *args, candidates)
        return await connection.fetch(QUERIES["fetch_traces_page"], *args)


async def _fetch_document(pool: Pool, query: str, *args: Any) -> Raw | None:
    """Runs query text that renders its whole answer as one JSON document."""
    async with pool.acquire() as connection:
        document: Raw | None = await connection.fetchval(query, *args)
        return document


def _window_args(window: AnalyticsWindow) -> tuple[Any, ...]:
    """The analytics queries' shared parameters, in their order: service, since, until,
    metadata keys, metadata values."""
    return (
        window.service,
        window.since,
        window.until,
        window.metadata_keys,
        window.metadata_values,
    )


async def fetch_high_drop_decisions(
    pool: Pool, threshold: float, window: AnalyticsWindow, limit: int
) -> Raw:
    threshold_arg = Decimal(str(threshold))
    query = QUERIES["fetch_high_drop_decisions"]
    document = await _fetch_document(pool, query, threshold_arg, *_window_args(window), limit)
    assert document is not None
    return document


async def fetch_drop_reasons(
    pool: Pool, window: AnalyticsWindow, trace_id: uuid.UUID | None, limit: int
) -> Raw:
    query = QUERIES["fetch_drop_reasons"]
    document = await _fetch_document(pool, query, *_window_args(window), trace_id, limit)
    assert document is not None
    return document


async def fetch_funnel(pool: Pool, trace_id: uuid.UUID) -> Raw | None:
    """The trace's decision funnel, or None when it has no decision events."""
    return await _fetch_document(pool, QUERIES["fetch_funnel"], trace_id)


async def fetch_metadata_values(pool: Pool, field: str, event_type: str | None, limit: int) -> Raw:
    document = await _fetch_document(
        pool, QUERIES["fetch_metadata_values"], field, event_type, limit
    )
    assert document is not None
    return document


# ---- API keys --------------------------------------------------------------------------------


async def insert_api_key(
    connection: Connection, name: str, scope: str, prefix: str, key_hash: bytes
) -> asyncpg.Record:
    """Stores a key's hash; returns its (id, created_at)."""
    record = await connection.fetchrow(QUERIES["insert_api_key"], name, scope, prefix, key_hash)
    assert record is not None
    return record


async def list_api_keys(connection: Connection) -> list[asyncpg.Record]:
    return await connection.fetch(QUERIES["list_api_keys"])


async def revoke_api_key(connection: Connection, key_id: int) -> bool:
    """Revokes the key; False when no active key has that id."""
    return await connection.fetchval(QUERIES["revoke_api_key"], key_id) is not None


async def fetch_api_key_hashes(pool: Pool, timeout_s: float) -> list[asyncpg.Record]:
    """Every key's (id, scope, key_hash, revoked); raises when the database does not answer."""
    async with pool.acquire(timeout=timeout_s) as connection:
        return await connection.fetch(QUERIES["fetch_api_key_hashes"], timeout=timeout_s)
