"""The Prometheus metrics and their text exposition, across worker processes when there are
several (prometheus-client's multiprocess mode, on when PROMETHEUS_MULTIPROC_DIR is set)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from xray_ingest.workers import pid_alive

if TYPE_CHECKING:  # the buffer counts into these metrics, so no import at run time
    from xray_ingest.buffer import Buffer
    from xray_ingest.db import Pool

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
SAMPLE_INTERVAL_S: Final = 1.0

# In multiprocess mode every metric update calls the process-id function (os.getpid, a system
# call) to notice a fork. Workers are spawned, never forked after this import, so this
# process's id is read once: a few system calls fewer on every request.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _PID: Final = os.getpid()
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _PID)  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

REQUESTS: Final = Counter(
    "xray_http_requests", "HTTP requests answered", ["route", "method", "status"]
)
REQUEST_SECONDS: Final = Histogram(
    "xray_http_request_duration_seconds",
    "Time from request start to the end of the response",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
EVENTS_ACCEPTED: Final = Counter("xray_events_accepted", "Events queued (acknowledged)")
EVENTS_REJECTED: Final = Counter("xray_events_rejected", "Events refused as invalid (400)")
EVENTS_COMMITTED: Final = Counter("xray_events_committed", "Events committed to the database")
EVENTS_DUPLICATE: Final = Counter(
    "xray_events_duplicate", "Events skipped because the same event was already stored"
)
EVENTS_DEAD_LETTERED: Final = Counter(
    "xray_events_dead_lettered", "Events the database refused, kept in dead_letter_events"
)
QUEUE_EVENTS: Final = Gauge(
    "xray_queue_events", "Events queued and not yet committed", multiprocess_mode="livesum"
)
QUEUE_BYTES: Final = Gauge(
    "xray_queue_bytes", "Bytes of events queued and not yet committed", multiprocess_mode="livesum"
)
FLUSH_EVENTS: Final = Histogram(
    "xray_flush_batch_events", "Events per committed COPY batch", buckets=_BATCH_BUCKETS
)
FLUSH_SECONDS: Final = Histogram(
    "xray_flush_duration_seconds", "Time to COPY and commit one batch", buckets=_LATENCY_BUCKETS
)
COPY_ERRORS: Final = Counter(
    "xray_copy_errors", "COPY attempts that failed (database down, or a row it refused)"
)
COPY_RETRIES: Final = Counter("xray_copy_retries", "Batches written again after a backoff")
POOL_CONNECTIONS: Final = Gauge(
    "xray_db_pool_connections", "Open database connections", multiprocess_mode="livesum"
)
POOL_IN_USE: Final = Gauge(
    "xray_db_pool_in_use", "Database connections checked out", multiprocess_mode="livesum"
)


class RequestTally:
    """This process's HTTP requests, counted and timed in plain Python and written to a request
    counter and a duration histogram (REQUESTS and REQUEST_SECONDS) by flush(): every
    SAMPLE_INTERVAL_S, before each scrape this process answers, and at shutdown.

    With several workers every metric update is a locked write into a memory-mapped file, and
    the three of each request (count, duration sum, bucket) cost a single-event POST 26k of its
    350k instructions. The price: a scrape answered by one worker sees the other workers'
    requests up to SAMPLE_INTERVAL_S late, and so it is with the events accepted (write_tallies);
    events committed are still counted as they happen."""

    def __init__(self, requests: Counter, durations: Histogram) -> None:
        self._requests = requests
        self._durations = durations
        self._upper_bounds: list[float] = list(durations._upper_bounds)  # its buckets, +Inf last
        self._counts: dict[tuple[str, str, int], int] = {}
        # Per route: how many durations fell in each bucket (each in the first that holds it, as
        # Histogram.observe() counts them), and their sum.
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def add(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        buckets = self._buckets.get(route)
        if buckets is None:
            buckets = self._buckets[route] = [0] * len(self._upper_bounds)
            self._sums[route] = 0.0
        buckets[bisect.bisect_left(self._upper_bounds, seconds)] += 1
        self._sums[route] += seconds

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (route, method, status), count in counts.items():
            self._requests.labels(route, method, str(status)).inc(count)
        all_buckets, self._buckets = self._buckets, {}
        sums, self._sums = self._sums, {}
        for route, buckets in all_buckets.items():
            # Histogram has no public call that adds many observations at once; these are the
            # values its observe() increments (test_metrics checks the result against it).
            histogram = self._durations.labels(route)
            histogram._sum.inc(sums[route])
            for value, count in zip(histogram._buckets, buckets, strict=True):
                if count:
                    value.inc(count)


def sample(buffer: Buffer, pool: Pool, tally: RequestTally) -> None:
    """Sets the gauges from this process's queue and pool, and writes out its request tally."""
    QUEUE_EVENTS.set(buffer.events)
    QUEUE_BYTES.set(buffer.bytes)
    size = pool.get_size()
    POOL_CONNECTIONS.set(size)
    POOL_IN_USE.set(size - pool.get_idle_size())
    write_tallies(buffer, tally)


def write_tallies(buffer: Buffer, tally: RequestTally) -> None:
    """Writes out this process's request tally and the events its queue accepted since the last
    call: counted in plain Python by Buffer.put, for the reason RequestTally gives (each
    increment of a multiprocess counter cost a single-event POST 8.8k instructions)."""
    tally.flush()
    counters = buffer.counters
    EVENTS_ACCEPTED.inc(counters.accepted - counters.accepted_in_metrics)
    counters.accepted_in_metrics = counters.accepted


async def sample_forever(buffer: Buffer, pool: Pool, tally: RequestTally) -> None:
    """Keeps the gauges and request metrics current, so a scrape answered by another worker
    sees this one's."""
    try:
        while True:
            sample(buffer, pool, tally)
            await asyncio.sleep(SAMPLE_INTERVAL_S)
    finally:
        write_tallies(buffer, tally)


_LIVE_GAUGE_FILE: Final = re.compile(r"gauge_live\w+_(\d+)\.db")


def forget_dead_workers(directory: Path) -> list[int]:
    """Drops the live-gauge files of workers that are gone, so a dead worker's last queue depth
    stops counting (uvicorn restarts dead workers but has no hook to tell prometheus-client).
    Called by each worker as it starts; returns the pids forgotten."""
    dead = sorted(
        {
            int(match[1])
            for path in directory.glob("gauge_live*.db")
            if (match := _LIVE_GAUGE_FILE.fullmatch(path.name)) and not pid_alive(int(match[1]))
        }
    )
    for pid in dead:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return dead


class _WrittenFilesCollector:
    """prometheus-client's MultiProcessCollector over the workers' files that are not empty.

    A worker creates each file and only then sizes it, and a scrape that reads it in between
    fails on the missing header: a 500 for the whole scrape, seen when a worker started while
    the other answered /metrics (prometheus/client_python#1199, unfixed in 0.26.0). An empty
    file holds nothing yet, so it is skipped."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        written = []
        for path in self._directory.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):  # a dead worker's, just removed
                if path.stat().st_size > 0:
                    written.append(str(path))
        merged: Iterable[Metric] = MultiProcessCollector.merge(written, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


def exposition(metrics_dir: Path | None) -> bytes:
    """The text exposition of every metric; with a metrics_dir (several workers), summed over
    the worker processes, whose values prometheus-client keeps in files there."""
    if metrics_dir is not None:
        registry = CollectorRegistry()
        registry.register(_WrittenFilesCollector(metrics_dir))
        return generate_latest(registry)
    return generate_latest(REGISTRY)
