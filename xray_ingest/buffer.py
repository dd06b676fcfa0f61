"""The bounded in-process queue of accepted events and the Flusher that COPYs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from xray_ingest import metrics
from xray_ingest.errors import QueueFullError, RejectedRowsError, ShuttingDownError
from xray_ingest.models import Row

logger = logging.getLogger(__name__)

RETRY_BASE_S = 0.05
RETRY_CAP_S = 5.0
# Past this fill of either bound the server reports itself unready (it still takes what fits).
READY_FILL = 0.9
# A collection lingers for more events only while it holds less than this share of a full batch.
# A COPY costs about 1.3 ms beyond its rows (~24 us each; one connection, scratch timings): a
# tenth of 5,000 already spreads that thin, and at the end of a burst no more events come, so
# lingering would only keep them from the database.
LINGER_SHARE = 0.1


class Sink(Protocol):
    """Where flushed rows go: db.PoolSink in the server, a fake in unit tests."""

    async def copy_events(self, rows: Sequence[Row]) -> int: ...

    async def store_dead_letter(self, row: Row, error: str) -> None: ...


# Positions in a chunk's rows of the events the database refused, with the reason.
Refusals = list[tuple[int, str]]


@dataclass(slots=True)
class Chunk:
    """The rows of one request, queued together. A durable request waits on `committed`."""

    rows: list[Row]
    size: int
    committed: asyncio.Future[Refusals] | None = None


def _refusals_in(chunk: Chunk, refused: dict[int, str]) -> Refusals:
    if not refused:
        return []
    return [(n, refused[id(row)]) for n, row in enumerate(chunk.rows) if id(row) in refused]


@dataclass(slots=True)
class Counters:
    accepted: int = 0
    # How many of `accepted` metrics.EVENTS_ACCEPTED has counted (see metrics.write_tallies).
    accepted_in_metrics: int = 0
    committed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    flushes: int = 0
    flush_errors: int = 0


class Buffer:
    """A queue of Chunks bounded by event count and bytes.

    An event counts against the bounds from put() until the flusher has committed it, so memory
    stays bounded however long the database is away.
    """

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.events = 0
        self.bytes = 0
        self.closed = False
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.counters = Counters()
        # While the flusher lingers: what put() resolves once enough events arrive (see wake_on).
        self._waker: asyncio.Future[None] | None = None
        self._events_to_wake = 0

    def has_room(self, events: int = 1, size: int = 0) -> bool:
        return self.events + events <= self.max_events and self.bytes + size <= self.max_bytes

    def is_ready(self) -> bool:
        """Open and below READY_FILL of both bounds: a load balancer should send more."""
        return (
            not self.closed
            and self.events < READY_FILL * self.max_events
            and self.bytes < READY_FILL * self.max_bytes
        )

    def check_open(self, size: int = 0) -> None:
        """Raises ShuttingDownError or QueueFullError when one event of `size` bytes could not
        be taken now."""
        if self.closed:
            raise ShuttingDownError
        if not self.has_room(1, size):
            raise QueueFullError

    def put(
        self, rows: list[Row], size: int, committed: asyncio.Future[Refusals] | None = None
    ) -> None:
        """Queues rows; raises QueueFullError or ShuttingDownError and then takes none of them.

        `committed` gets the refused rows' positions once the rows are committed."""
        if self.closed:
            raise ShuttingDownError
        if not self.has_room(len(rows), size):
            raise QueueFullError
        self.events += len(rows)
        self.bytes += size
        self.counters.accepted += len(rows)
        self.queue.put_nowait(Chunk(rows, size, committed))
        if self._waker is not None:
            self._events_to_wake -= len(rows)
            if committed is not None or self._events_to_wake <= 0:
                self.wake()

    def wake_on(self, events: int) -> asyncio.Future[None]:
        """A future that put() resolves once `events` more events are queued, or any durable
        chunk (its request waits for the commit); wake() resolves it sooner. One at a time."""
        self._waker = asyncio.get_running_loop().create_future()
        self._events_to_wake = events
        return self._waker

    def wake(self) -> None:
        """Resolves the future of wake_on(), if one is waiting."""
        waker, self._waker = self._waker, None
        if waker is not None and not waker.done():
            waker.set_result(None)

    def release(self, chunk: Chunk) -> None:
        """Marks a chunk as committed (or given up), freeing its room."""
        self.events -= len(chunk.rows)
        self.bytes -= chunk.size
        self.queue.task_done()


@dataclass
class Flusher:
    """Drains the buffer with `connections` concurrent workers, each writing batches of up to
    max_events events. A batch smaller than LINGER_SHARE of that waits up to interval_s from its
    first chunk for more; a larger one takes what is queued and goes."""

    buffer: Buffer
    sink: Sink
    max_events: int
    interval_s: float
    connections: int
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Set by stop(): collections no longer linger, so shutdown drains at once.
    _stopping: bool = False
    # One worker collects at a time, while the others write: lingering side by side, they would
    # split a trickle of requests into several small COPYs, each with its own commit.
    _collecting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"flusher-{n}") for n in range(self.connections)
        ]

    async def stop(self, timeout_s: float) -> int:
        """Stops accepting, waits up to timeout_s for everything queued to be committed, and
        returns the number of events that were not (and so are lost)."""
        self.buffer.closed = True
        self._stopping = True
        self.buffer.wake()  # a lingering collection ends now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.buffer.queue.join(), timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        lost = self.buffer.events
        if lost:
            logger.error(
                "shutdown deadline passed with %d events not committed",
                lost,
                extra={"action": "shutdown", "rows": lost},
            )
        return lost

    async def _collect(self) -> list[Chunk]:
        queue = self.buffer.queue
        chunks = [await queue.get()]
        count = len(chunks[0].rows)
        # A durable request is waiting for this batch's commit: every ms of linger is its latency.
        durable = chunks[0].committed is not None
        deadline = time.monotonic() + self.interval_s
        enough = max(1, math.ceil(self.max_events * LINGER_SHARE))
        while count < self.max_events:
            if queue.empty():
                delay = deadline - time.monotonic()
                if delay <= 0 or durable or self._stopping or count >= enough:
                    break
                # Linger briefly so a trickle of small requests still makes one COPY.
                await self._linger(delay, enough - count)
                continue
            chunk = queue.get_nowait()
            chunks.append(chunk)
            count += len(chunk.rows)
            durable = durable or chunk.committed is not None
        return chunks

    async def _linger(self, delay_s: float, events: int) -> None:
        """Sleeps delay_s, or until `events` more events or a durable chunk are queued, or stop()
        is called. Not woken for each request: a get() with a timeout for each cost about 95k
        instructions and 12 us of CPU per single-event request that arrived meanwhile."""
        more = self.buffer.wake_on(events)
        timer = asyncio.get_running_loop().call_later(delay_s, self.buffer.wake)
        try:
            await more
        finally:
            timer.cancel()
            self.buffer.wake()  # also when this task is cancelled: no waker outlives it

    async def _work(self) -> None:
        while True:
            async with self._collecting:
                chunks = await self._collect()
            rows = chunks[0].rows if len(chunks) == 1 else [r for c in chunks for r in c.rows]
            refused = await self._write(rows)
            for chunk in chunks:
                if chunk.committed is not None and not chunk.committed.done():
                    chunk.committed.set_result(_refusals_in(chunk, refused))
                self.buffer.release(chunk)

    async def _write(self, rows: list[Row]) -> dict[int, str]:
        """Writes rows, retrying with capped exponential backoff and jitter until they are in.

        Returns the refused (dead-lettered) rows, keyed by id(row), with the reason."""
        attempt = 0
        while True:
            started = time.perf_counter()
            refused: dict[int, str] = {}
            try:
                await self._write_isolating(rows, refused)
            except Exception:
                attempt += 1
                self.buffer.counters.flush_errors += 1
                metrics.COPY_ERRORS.inc()
                delay = min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
                logger.exception(
                    "flush of %d events failed (attempt %d); retrying in %.2fs",
                    len(rows),
                    attempt,
                    delay,
                    extra={"action": "flush", "rows": len(rows), "attempt": attempt},
                )
                await asyncio.sleep(delay)
                metrics.COPY_RETRIES.inc()
                continue
            seconds = time.perf_counter() - started
            self.buffer.counters.flushes += 1
            metrics.FLUSH_EVENTS.observe(len(rows))
            metrics.FLUSH_SECONDS.observe(seconds)
            logger.debug(
                "flushed %d events",
                len(rows),
                extra={"action": "flush", "rows": len(rows), "ms": round(seconds * 1000, 2)},
            )
            return refused

    async def _write_isolating(self, rows: Sequence[Row], refused: dict[int, str]) -> None:
        """Writes rows; when the database refuses some row, halves the batch until the refused
        rows stand alone and moves each to the dead-letter table (and into `refused`)."""
        counters = self.buffer.counters
        try:
            stored = await self.sink.copy_events(rows)
        except RejectedRowsError as exc:
            metrics.COPY_ERRORS.inc()
            if len(rows) == 1:
                await self.sink.store_dead_letter(rows[0], str(exc))
                refused[id(rows[0])] = str(exc)
                counters.dead_lettered += 1
                metrics.EVENTS_DEAD_LETTERED.inc()
                logger.warning(
                    "dead-lettered one event the database refused: %s",
                    exc,
                    extra={"action": "dead_letter", "rows": 1},
                )
                return
            middle = len(rows) // 2
            await self._write_isolating(rows[:middle], refused)
            await self._write_isolating(rows[middle:], refused)
            return
        counters.committed += stored
        counters.duplicates += len(rows) - stored
        metrics.EVENTS_COMMITTED.inc(stored)
        metrics.EVENTS_DUPLICATE.inc(len(rows) - stored)
