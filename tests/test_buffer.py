"""The bounded buffer and the flusher: a fake sink for triggers and failures, then real COPY."""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from tests import samples
from tests.samples import dumps
from xray_ingest import buffer as buffer_module
from xray_ingest import db
from xray_ingest.buffer import Buffer, Flusher, Refusals
from xray_ingest.errors import QueueFullError, RejectedRowsError, ShuttingDownError
from xray_ingest.models import INT4_MAX, Row, decode_row

POISON = "poison"


def make_rows(count: int, event_type: str = "cache_lookup", **fields: object) -> list[Row]:
    return [
        decode_row(dumps(samples.custom(event_type=event_type, **fields))) for _ in range(count)
    ]


class FakeSink:
    """Records batches; can be slow, fail a number of times, or refuse POISON rows."""

    def __init__(self, delay_s: float = 0.0, failures: int = 0) -> None:
        self.delay_s = delay_s
        self.failures = failures
        self.batches: list[list[Row]] = []
        self.dead: list[tuple[Row, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def stored(self) -> list[Row]:
        return [row for batch in self.batches for row in batch]

    async def copy_events(self, rows: Sequence[Row]) -> int:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.failures:
                self.failures -= 1
                raise ConnectionResetError("database went away")
            if any(row[1] == POISON for row in rows):
                raise RejectedRowsError("refused")
            self.batches.append(list(rows))
            return len(rows)
        finally:
            self.in_flight -= 1

    async def store_dead_letter(self, row: Row, error: str) -> None:
        self.dead.append((row, error))


def flusher_for(
    sink: FakeSink | db.PoolSink,
    *,
    max_events: int = 100,
    interval_s: float = 0.01,
    connections: int = 1,
    buffer: Buffer | None = None,
) -> Flusher:
    return Flusher(
        buffer or Buffer(max_events=10_000, max_bytes=10_000_000),
        sink,
        max_events=max_events,
        interval_s=interval_s,
        connections=connections,
    )


async def wait_for(condition: object, timeout_s: float = 5.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffer_module, "RETRY_BASE_S", 0.001)
    monkeypatch.setattr(buffer_module, "RETRY_CAP_S", 0.01)


def test_put_beyond_the_event_bound_takes_nothing() -> None:
    buffer = Buffer(max_events=5, max_bytes=1_000)
    buffer.put(make_rows(3), 10)
    with pytest.raises(QueueFullError):
        buffer.put(make_rows(3), 10)
    assert (buffer.events, buffer.bytes, buffer.queue.qsize()) == (3, 10, 1)
    buffer.put(make_rows(2), 10)
    assert not buffer.has_room()


def test_put_beyond_the_byte_bound_takes_nothing() -> None:
    buffer = Buffer(max_events=100, max_bytes=1_000)
    buffer.put(make_rows(1), 900)
    with pytest.raises(QueueFullError):
        buffer.put(make_rows(1), 101)
    assert (buffer.events, buffer.bytes) == (1, 900)


def test_release_frees_room_and_closed_buffer_refuses() -> None:
    buffer = Buffer(max_events=1, max_bytes=100)
    buffer.put(make_rows(1), 10)
    buffer.release(buffer.queue.get_nowait())
    assert (buffer.events, buffer.bytes) == (0, 0)
    buffer.closed = True
    with pytest.raises(ShuttingDownError):
        buffer.put(make_rows(1), 10)


async def test_full_batches_flush_without_waiting_for_the_timer() -> None:
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=10, interval_s=30)
    for row in make_rows(20):
        flusher.buffer.put([row], 1)
    flusher.start()
    await wait_for(lambda: len(sink.stored) == 20, timeout_s=2)
    assert [len(batch) for batch in sink.batches] == [10, 10]
    assert await flusher.stop(1) == 0


async def test_a_batch_reaching_the_linger_share_during_the_linger_is_written_at_once() -> None:
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=100, interval_s=30)
    assert flusher.max_events * buffer_module.LINGER_SHARE == 10
    flusher.start()
    for row in make_rows(10):
        flusher.buffer.put([row], 1)
        await asyncio.sleep(0.001)
    await wait_for(lambda: len(sink.stored) == 10, timeout_s=2)
    assert [len(batch) for batch in sink.batches] == [10]
    assert await flusher.stop(1) == 0


async def test_a_batch_of_the_linger_share_goes_at_once_and_a_smaller_one_lingers() -> None:
    # At the end of a burst no more events come: a batch this large would linger for nothing.
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=1000, interval_s=30)
    flusher.start()
    flusher.buffer.put(make_rows(100), 1)
    await wait_for(lambda: len(sink.stored) == 100, timeout_s=2)
    flusher.buffer.put(make_rows(99), 1)
    await asyncio.sleep(0.2)
    assert [len(batch) for batch in sink.batches] == [100]
    assert await flusher.stop(1) == 0  # stop() cuts the linger short
    assert [len(batch) for batch in sink.batches] == [100, 99]


async def test_the_lingering_flusher_is_woken_by_a_full_batch_or_a_durable_chunk_only() -> None:
    buffer = Buffer(max_events=100, max_bytes=1000)
    more = buffer.wake_on(3)
    buffer.put(make_rows(2), 1)
    await asyncio.sleep(0)
    assert not more.done()  # each request does not wake it
    buffer.put(make_rows(1), 1)
    assert more.done()
    durable = buffer.wake_on(50)
    buffer.put(make_rows(1), 1, asyncio.get_running_loop().create_future())
    assert durable.done()
    stopped = buffer.wake_on(50)
    buffer.wake()
    assert stopped.done()


async def test_timer_flushes_a_small_batch_collecting_what_arrives_meanwhile() -> None:
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=1000, interval_s=0.2)
    flusher.start()
    flusher.buffer.put(make_rows(1), 1)
    await asyncio.sleep(0.05)
    assert sink.batches == []
    flusher.buffer.put(make_rows(2), 1)
    await wait_for(lambda: len(sink.stored) == 3)
    assert [len(batch) for batch in sink.batches] == [3]
    await flusher.stop(1)


async def test_several_connections_write_batches_concurrently() -> None:
    sink = FakeSink(delay_s=0.1)
    flusher = flusher_for(sink, max_events=10, connections=3)
    flusher.start()
    for _ in range(3):
        flusher.buffer.put(make_rows(10), 1)
    await wait_for(lambda: len(sink.stored) == 30)
    assert sink.max_in_flight == 3
    await flusher.stop(1)


async def test_a_trickle_makes_one_batch_even_with_several_connections() -> None:
    # Lingering side by side, idle connections would share the arrivals out between them.
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=1000, interval_s=0.2, connections=3)
    flusher.start()
    for row in make_rows(6):
        flusher.buffer.put([row], 1)
        await asyncio.sleep(0.01)
    await wait_for(lambda: len(sink.stored) == 6)
    assert [len(batch) for batch in sink.batches] == [6]
    await flusher.stop(1)


async def test_failed_batch_is_retried_until_it_is_stored_once() -> None:
    sink = FakeSink(failures=3)
    flusher = flusher_for(sink)
    rows = make_rows(5)
    flusher.buffer.put(rows, 50)
    flusher.start()
    await wait_for(lambda: len(sink.stored) == 5)
    assert sink.stored == rows
    assert flusher.buffer.counters.flush_errors == 3
    assert flusher.buffer.counters.committed == 5
    assert flusher.buffer.events == 0
    await flusher.stop(1)


async def test_refused_row_is_isolated_and_dead_lettered_while_the_rest_is_stored() -> None:
    sink = FakeSink()
    flusher = flusher_for(sink)
    good = make_rows(6)
    bad = make_rows(1, event_type=POISON)
    rows = good[:4] + bad + good[4:]
    flusher.buffer.put(rows, 70)
    flusher.start()
    await wait_for(lambda: flusher.buffer.events == 0)
    assert sorted(map(id, sink.stored)) == sorted(map(id, good))
    assert [row for row, _ in sink.dead] == bad
    assert flusher.buffer.counters.dead_lettered == 1
    await flusher.stop(1)


async def test_stop_drains_everything_queued() -> None:
    sink = FakeSink(delay_s=0.01)
    flusher = flusher_for(sink, max_events=7, connections=2)
    flusher.start()
    for _ in range(50):
        flusher.buffer.put(make_rows(3), 1)
    assert await flusher.stop(5) == 0
    assert len(sink.stored) == 150
    with pytest.raises(ShuttingDownError):
        flusher.buffer.put(make_rows(1), 1)


async def test_stop_past_its_deadline_reports_what_was_not_committed() -> None:
    sink = FakeSink(failures=10**9)
    flusher = flusher_for(sink)
    flusher.start()
    flusher.buffer.put(make_rows(4), 1)
    assert await flusher.stop(0.1) == 4


# ---- real COPY -------------------------------------------------------------------------------


async def test_copy_stores_rows_with_payloads_and_trace_start(pool: db.Pool) -> None:
    trace_id = str(uuid.uuid4())
    events = [
        samples.llm_call(trace_id=trace_id, timestamp="2024-01-03T10:30:05Z"),
        samples.decision(trace_id=trace_id, timestamp="2024-01-03T10:30:01+01:00"),
    ]
    rows = [decode_row(dumps(event)) for event in events]
    assert await db.copy_events(pool, rows) == 2
    async with pool.acquire() as connection:
        stored = await connection.fetch(
            "SELECT span_id, event_type, duration_ms, data::text AS data FROM events"
        )
        start = await connection.fetchval(
            "SELECT start_time FROM traces WHERE trace_id = $1", uuid.UUID(trace_id)
        )
    assert {(str(r["span_id"]), r["event_type"], r["duration_ms"]) for r in stored} == {
        (events[0]["span_id"], "llm_call", 567),
        (events[1]["span_id"], "decision", None),
    }
    assert start == rows[1][6]


def _net_core(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


def _send_buffer_after_widening(before: int) -> int:
    """A socket's send buffer once widened: one already that wide is left alone; else the kernel
    caps SEND_BUFFER_BYTES at wmem_max and doubles it."""
    if before >= db.SEND_BUFFER_BYTES:
        return before
    return 2 * min(db.SEND_BUFFER_BYTES, _net_core("wmem_max"))


def test_a_unix_socket_gets_the_wide_send_buffer_and_a_tcp_socket_keeps_its_own() -> None:
    unix, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with unix, peer, tcp:
        unix_before = unix.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        tcp_before = tcp.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        db.widen_send_buffer(unix)
        db.widen_send_buffer(tcp)
        widened = unix.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert widened == _send_buffer_after_widening(unix_before)
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == tcp_before


async def test_pool_connections_over_a_unix_socket_get_the_wide_send_buffer(
    database_dsn: str,
) -> None:
    # The same database through the server's Unix socket (the embedded server's DSN is one).
    probe = await asyncpg.connect(database_dsn)
    try:
        settings = await probe.fetchrow(
            "SELECT current_setting('unix_socket_directories'), current_setting('port'),"
            " current_database(), current_user"
        )
        assert settings is not None
        folders, port, name, user = settings
        folder = folders.split(",")[0].strip()
    finally:
        await probe.close()
    pool = await db.create_pool(f"postgresql://{user}@/{name}?host={folder}&port={port}", 1)
    try:
        async with pool.acquire() as connection:
            sock = connection._con._transport.get_extra_info("socket")  # type: ignore[attr-defined]
            assert sock.family == socket.AF_UNIX
            sent = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            # A new Unix socket starts at wmem_default.
            assert sent == _send_buffer_after_widening(_net_core("wmem_default"))
    finally:
        await pool.close()


async def test_a_connection_back_in_the_pool_is_not_reset_but_its_transaction_is_ended(
    database_dsn: str,
) -> None:
    pool = await db.create_pool(database_dsn, max_size=1)
    try:
        async with pool.acquire() as connection:
            await connection.execute("SET application_name = 'kept'")
            transaction = connection.transaction()
            await transaction.start()
        async with pool.acquire() as connection:
            # asyncpg's default reset query (RESET ALL, ...) would have undone the SET.
            assert await connection.fetchval("SHOW application_name") == "kept"
            assert not connection.is_in_transaction()
    finally:
        await pool.close()


async def test_copy_skips_events_already_stored_or_repeated_in_the_batch(pool: db.Pool) -> None:
    rows = make_rows(3)
    assert await db.copy_events(pool, rows) == 3
    fresh = make_rows(2)
    assert await db.copy_events(pool, [rows[0], *fresh, fresh[0], rows[2]]) == 2
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM events") == 5


@pytest.mark.parametrize(
    "timestamp",
    [
        "0002-01-01T00:00:00+14:00",
        "9998-12-31T23:59:59.999999-12:00",
        # A microsecond before the binary format's epoch: a negative count of microseconds.
        "1999-12-31T23:59:59.999999Z",
    ],
)
async def test_the_first_and_last_years_accepted_store_with_the_longest_duration(
    pool: db.Pool, timestamp: str
) -> None:
    # In UTC, and at timestamp + duration_ms, these stay inside Python's datetime range (the
    # trace span would otherwise be refused), and the traces upsert turns the span's
    # microseconds back into the exact times, however far from 2000.
    rows = make_rows(1, timestamp=timestamp, duration_ms=INT4_MAX)
    assert await db.copy_events(pool, rows) == 1
    async with pool.acquire() as connection:
        span = await connection.fetchrow("SELECT start_time, end_time FROM traces")
    assert span is not None
    assert tuple(span) == (rows[0][6], rows[0][6] + timedelta(milliseconds=INT4_MAX))


async def test_each_trace_of_a_shuffled_batch_gets_its_own_span(pool: db.Pool) -> None:
    rows = [
        row
        for trace in range(5)
        for row in make_rows(
            1,
            trace_id=str(uuid.UUID(int=trace + 1)),
            timestamp=f"2024-01-03T1{trace}:00:00Z",
            duration_ms=1000 * trace,
        )
        + make_rows(3, trace_id=str(uuid.UUID(int=trace + 1)), timestamp="2024-01-03T12:30:00Z")
    ]
    random.Random(7).shuffle(rows)
    await db.copy_events(pool, rows)
    expected = {
        row[2]: (
            min(r[6] for r in rows if r[2] == row[2]),
            max(r[6] + timedelta(milliseconds=r[7] or 0) for r in rows if r[2] == row[2]),
        )
        for row in rows
    }
    async with pool.acquire() as connection:
        stored = await connection.fetch("SELECT trace_id, start_time, end_time FROM traces")
    assert {r["trace_id"]: (r["start_time"], r["end_time"]) for r in stored} == expected


async def test_earlier_event_moves_the_trace_start(pool: db.Pool) -> None:
    trace_id = str(uuid.uuid4())
    late = make_rows(1, trace_id=trace_id, timestamp="2024-01-03T12:00:00Z")
    early = make_rows(1, trace_id=trace_id, timestamp="2024-01-03T09:00:00Z")
    await db.copy_events(pool, late)
    await db.copy_events(pool, early)
    await db.copy_events(pool, late)
    async with pool.acquire() as connection:
        start = await connection.fetchval("SELECT start_time FROM traces")
    assert start == early[0][6]


async def test_a_query_on_a_session_the_server_just_ended_counts_as_unanswered(
    pool: db.Pool,
) -> None:
    # Depending on what asyncpg has read of the end when the query goes out, it raises
    # ConnectionDoesNotExistError, InterfaceError or InternalClientError; health checks, key
    # refreshes and reads must take each as "the database did not answer", never crash on it.
    raised: set[str] = set()
    for _ in range(20):
        held = await pool.acquire()
        async with pool.acquire() as other:
            await other.execute("SELECT pg_terminate_backend($1)", held.get_server_pid())
        with pytest.raises(db.UNANSWERED) as error:
            await held.execute("SELECT 1")
        raised.add(type(error.value).__name__)
        await pool.release(held)
    print(f"\nraised: {sorted(raised)}")


async def flush_around(pool: db.Pool, poison: Row) -> Flusher:
    """Flushes five good rows with `poison` amid them through the real sink, checks that the
    five landed, and returns the stopped flusher."""
    good = make_rows(5)
    flusher = flusher_for(db.PoolSink(pool))
    flusher.buffer.put([*good[:2], poison, *good[2:]], 100)
    flusher.start()
    await wait_for(lambda: flusher.buffer.events == 0)
    await flusher.stop(1)
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM events") == 5
    return flusher


async def test_row_the_database_refuses_goes_to_dead_letters_and_the_rest_lands(
    pool: db.Pool,
) -> None:
    # Bypasses validation on purpose: jsonb refuses \u0000.
    poison_row = (*make_rows(1)[0][:8], b'{"event_type": "x", "bad": "\\u0000"}')
    flusher = await flush_around(pool, poison_row)
    async with pool.acquire() as connection:
        dead = await connection.fetchrow("SELECT payload, error FROM dead_letter_events")
    assert dead is not None
    assert dead["payload"] == '{"event_type": "x", "bad": "\\u0000"}'
    assert "UntranslatableCharacter" in dead["error"]
    assert flusher.buffer.counters.dead_lettered == 1


def test_a_dead_letter_payload_is_text_the_database_can_store() -> None:
    assert db.dead_letter_text(b'{"a": "\xc3\xa9"}') == '{"a": "\u00e9"}'
    assert db.dead_letter_text(b'{"a": "\xff"}') == '{"a": "\\xff"}'
    assert db.dead_letter_text(b'{"a": "\x00"}') == '{"a": "\\x00"}'
    assert db.dead_letter_text(12345) == "12345"


def unpackable(row: Row) -> Row:
    """A row that validation would never let through: duration_ms past int4 (struct.error)."""
    return (*row[:7], INT4_MAX + 1, row[8])


def overflowing(row: Row) -> Row:
    """A row whose trace span ends past Python's datetime range (OverflowError)."""
    return (*row[:6], datetime.max.replace(tzinfo=UTC), 5_000, row[8])


def mistyped(row: Row) -> Row:
    """A row holding a value of a type packing does not take (TypeError): only a bug could make
    one, and writing it again would fail the same way."""
    return (*row[:8], 12345)  # type: ignore[return-value]


@pytest.mark.parametrize("spoil", [unpackable, overflowing, mistyped])
async def test_a_row_that_cannot_be_written_is_dead_lettered_not_retried_forever(
    pool: db.Pool, spoil: Callable[[Row], Row]
) -> None:
    flusher = await flush_around(pool, spoil(make_rows(1)[0]))
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM dead_letter_events") == 1
    assert flusher.buffer.counters.dead_lettered == 1
    assert flusher.buffer.counters.flush_errors == 0


@pytest.mark.parametrize("spoil", [unpackable, overflowing, mistyped])
async def test_a_failed_store_rolls_back_before_the_connection_goes_back(
    pool: db.Pool, spoil: Callable[[Row], Row]
) -> None:
    # asyncpg rolls back a transaction left open too, but reports it to the loop's handler.
    reported: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        with pytest.raises(RejectedRowsError):
            await db.copy_events(pool, [spoil(make_rows(1)[0])])
        assert reported == []
        assert await db.copy_events(pool, make_rows(2)) == 2
        # What the handler sees when a transaction is left open.
        async with pool.acquire() as connection:
            await connection.execute("BEGIN")
        assert len(reported) == 1 and "active transaction" in reported[0]
    finally:
        loop.set_exception_handler(None)


async def test_stop_cuts_the_linger_short() -> None:
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=1000, interval_s=60)
    flusher.start()
    flusher.buffer.put(make_rows(2), 1)
    await asyncio.sleep(0.05)
    assert await flusher.stop(5) == 0
    assert len(sink.stored) == 2


async def test_a_durable_request_does_not_wait_for_the_linger() -> None:
    sink = FakeSink()
    flusher = flusher_for(sink, max_events=1000, interval_s=60)
    flusher.start()
    flusher.buffer.put(make_rows(2), 1)  # not durable: lingers (up to 60 s) for company
    await asyncio.sleep(0.05)
    assert sink.batches == []
    committed: asyncio.Future[Refusals] = asyncio.get_running_loop().create_future()
    flusher.buffer.put(make_rows(1), 1, committed)
    # The durable chunk joins the lingering batch, which is then written at once.
    assert await asyncio.wait_for(committed, 5) == []
    assert [len(batch) for batch in sink.batches] == [3]
    assert await flusher.stop(5) == 0
    assert len(sink.stored) == 3
