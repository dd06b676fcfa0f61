"""Shared benchmark plumbing: a database to measure in, realistic events, a lean HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import uvloop

from xray_ingest.embedded import postgres_or_throwaway
from xray_ingest.migrate import migrate

PROJECT_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"
_WORDS = [
    "price",
    "rating",
    "stock",
    "relevance",
    "brand",
    "shipping",
    "review",
    "seller",
    "color",
    "size",
]


def with_database(dsn: str, name: str) -> str:
    """The same server DSN, pointing at database `name`."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def postgres_server() -> contextlib.AbstractContextManager[str]:
    """XRAY_BENCH_DSN or DATABASE_URL when set, else a throwaway embedded PostgreSQL."""
    return postgres_or_throwaway(os.environ.get("XRAY_BENCH_DSN") or os.environ.get("DATABASE_URL"))


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str) -> AsyncIterator[str]:
    """A new migrated database for one benchmark run, dropped afterwards."""
    name = f"xray_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        dsn = with_database(server_dsn, name)
        await migrate(dsn)
        yield dsn
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A throwaway git worktree of ref."""
    with tempfile.TemporaryDirectory(prefix="xray-before-") as folder:
        path = Path(folder) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(path), ref],
            cwd=PROJECT_DIR,
            check=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=PROJECT_DIR, check=False
            )


@contextlib.asynccontextmanager
async def database_migrated_by(server_dsn: str, tree: Path) -> AsyncIterator[str]:
    """A new database migrated by the code in tree (its schema may be older than ours)."""
    name = f"xray_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        dsn = with_database(server_dsn, name)
        subprocess.run(
            [sys.executable, "-m", "xray_ingest", "migrate"],
            cwd=tree,
            env={**os.environ, "DATABASE_URL": dsn},
            check=True,
            capture_output=True,
        )
        yield dsn
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def realistic_event(trace_id: str, index: int, started: datetime) -> dict[str, Any]:
    """A ~1 KB llm_call or decision event, as the SDK sends them, with a unique span_id."""
    common = {
        "trace_id": trace_id,
        "span_id": str(uuid.uuid4()),
        "timestamp": (started + timedelta(milliseconds=index * 7)).isoformat(),
        "service": "competitor-search",
        "duration_ms": random.randint(5, 3000),
        "metadata": {"domain": "retail", "user_id": f"u-{random.randint(1, 500)}"},
    }
    if index % 2:
        total = random.randint(50, 500)
        kept = random.randint(0, total)
        return {
            **common,
            "event_type": "decision",
            "decision": {
                "input_count": total,
                "output_count": kept,
                "kept": [{"count": kept, "reason": "matches the query"}],
                "dropped": [
                    {"count": (total - kept) // 2, "reason": random.choice(_WORDS)},
                    {"count": total - kept - (total - kept) // 2, "reason": "out of stock"},
                ],
            },
            "criteria": {"max_price": 50, "min_rating": 4, "ships_to": ["DE", "FR", "NL"]},
            "reasoning": {"summary": " ".join(random.choices(_WORDS, k=60))},
        }
    return {
        **common,
        "event_type": "llm_call",
        "reasoning": {"summary": "Picked the top 3 by relevance", "confidence": 0.85},
        "model": {"provider": "openai", "name": "gpt-4o", "params": {"temperature": 0.2}},
        "input": {
            "input_tokens": random.randint(100, 2000),
            "raw_prompt": " ".join(random.choices(_WORDS, k=70)),
        },
        "output": {"output_tokens": random.randint(10, 500), "finish_reason": "stop"},
        "metrics": {"latency_ms": random.randint(100, 3000), "cost_usd": 0.0021},
    }


def realistic_events(count: int) -> list[dict[str, Any]]:
    started = datetime.now(UTC) - timedelta(hours=1)
    events: list[dict[str, Any]] = []
    while len(events) < count:
        trace_id = str(uuid.uuid4())
        events += [realistic_event(trace_id, n, started) for n in range(10)]
    return events[:count]


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant of it."""
    pids = [pid]
    for parent in pids:  # grows while it is walked
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(child) for child in task.read_text().split()]
    return pids


def peak_rss_mib(pid: int) -> float:
    """One process's peak resident memory so far (VmHWM), in MiB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) one process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (neither idle nor waiting on I/O), all cores."""
    with open("/proc/stat") as stat:
        ticks = [int(n) for n in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


T = TypeVar("T")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)
# The committed-events counter's sample line in /metrics.
_COMMITTED_METRIC = re.compile(rb"^xray_events_committed_total ([0-9.e+]+)$", re.MULTILINE)


# How long wait_committed waits between two scrapes of /metrics, at most and at least. A scrape
# costs the server about 1.5 ms of CPU (300 scrapes of an idle server, one or two workers), taken
# from the flushers while the queue drains: one every 10 ms made 58 scrapes in a run of batches
# of 100 whose queue drained in 0.97 s, where this spacing makes about 11.
SCRAPE_MAX_S = 0.1
SCRAPE_MIN_S = 0.01


def next_scrape_s(
    remaining: float, previous: tuple[float, float] | None, latest: tuple[float, float]
) -> float:
    """Seconds until the next scrape: half the time the remaining events would take at the rate
    between the two latest scrapes, each a (time, committed) pair; so the scrapes close in on
    the end, and the last comes at most SCRAPE_MIN_S after it when the rate holds."""
    if previous is None:
        return SCRAPE_MIN_S
    seconds = latest[0] - previous[0]
    progress = latest[1] - previous[1]
    if progress <= 0 or seconds <= 0:
        return SCRAPE_MAX_S
    return min(SCRAPE_MAX_S, max(SCRAPE_MIN_S, 0.5 * remaining * seconds / progress))


class ServerProcess:
    """`xray-ingest serve` with default settings (as a user starts it) on a free port."""

    def __init__(
        self,
        dsn: str,
        cwd: Path = PROJECT_DIR,
        module: Sequence[str] = ("xray_ingest", "serve"),
        wrapper: Sequence[str] = (),
        **env: str,
    ) -> None:
        """cwd: the checkout whose xray_ingest runs (`python -m` imports from there first);
        module: what `python -m` runs, given `--port` (benchmarks.floor_app takes it too);
        wrapper: a command that runs the server's (valgrind, say)."""
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self._final_output = ""
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", *module, "--port", str(self.port)],
            env={**os.environ, "DATABASE_URL": dsn, **env},
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.output()}")
            try:
                client = await HttpClient.connect(self.port)
                status, _ = await client.request(b"GET", b"/health")
                client.close()
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            await asyncio.sleep(0.1)

    async def wait_committed(self, events: int) -> bool:
        """Waits until the server's metrics count `events` committed (summed over its workers);
        False at once for a server that has no /metrics.

        Cheap for the database under test, unlike polling count(*) over a growing table on a
        new connection, which costs the server's PostgreSQL a backend start and a scan each
        time. Callers confirm with count_events() afterwards (and poll it for a server that has
        no /metrics). Scrapes are spaced by next_scrape_s: each costs the server CPU while it
        is still committing, inside the timed span."""
        client = await HttpClient.connect(self.port)
        try:
            previous: tuple[float, float] | None = None
            while True:
                status, payload = await client.request(b"GET", b"/metrics")
                if status == 404:
                    return False  # a server from before /metrics: the caller's count() waits
                if status != 200:
                    raise RuntimeError(
                        f"/metrics answered {status}: {payload[:200]!r}\n"
                        f"the server's log ends with:\n{self.output()[-3000:]}"
                    )
                match = _COMMITTED_METRIC.search(payload)
                committed = float(match[1]) if match is not None else 0.0
                if committed >= events:
                    return True
                latest = (time.perf_counter(), committed)
                await asyncio.sleep(next_scrape_s(events - committed, previous, latest))
                previous = latest
        finally:
            client.close()

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its live worker processes."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def peak_rss_mib(self) -> float:
        """Peak resident memory (VmHWM) in MiB, summed over the server and its worker processes.
        An upper bound when there are workers: their peaks need not have come at the same time."""
        return sum(peak_rss_mib(pid) for pid in process_tree(self.process.pid))

    def output(self) -> str:
        """The server's log so far; once stopped, all of it (stop() keeps it)."""
        if self.log.closed:
            return self._final_output
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._final_output = self.output()
        self.log.close()


class HttpClient(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client, one request at a time, as an asyncio Protocol: the
    load generator must cost far less than the server it measures, so it sends pre-encoded
    bytes and parses only the status and Content-Length of each response."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._response: asyncio.Future[tuple[int, bytes]] | None = None

    @classmethod
    async def connect(cls, port: int) -> HttpClient:
        _, client = await asyncio.get_running_loop().create_connection(cls, "127.0.0.1", port)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received += data
        end = self._received.find(b"\r\n\r\n")
        if end < 0 or self._response is None:
            return
        length = _CONTENT_LENGTH.search(self._received, 0, end + 2)
        body_start = end + 4
        body_end = body_start + (int(length[1]) if length else 0)
        if len(self._received) < body_end:
            return
        status = int(self._received[9:12])
        payload = bytes(self._received[body_start:body_end])
        del self._received[:body_end]
        self._response.set_result((status, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_exception(exc or ConnectionResetError("server closed"))

    async def request(
        self, method: bytes, path: bytes, body: bytes = b"", content_type: bytes = b""
    ) -> tuple[int, bytes]:
        assert self._transport is not None
        head = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
        if body:
            head.append(b"Content-Type: " + (content_type or b"application/json"))
            head.append(b"Content-Length: " + str(len(body)).encode())
        self._response = asyncio.get_running_loop().create_future()
        self._transport.writelines((b"\r\n".join(head), b"\r\n\r\n", body))
        try:
            return await self._response
        finally:
            self._response = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def execute(dsn: str, *statements: str) -> None:
    """Runs each statement in turn on a new connection (TRUNCATE, CHECKPOINT between runs)."""
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def wait_stored(dsn: str, events: int) -> None:
    """Waits until the events table holds `events` rows."""
    while await count_events(dsn) < events:
        await asyncio.sleep(0.02)


async def count_events(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM events")
        return count
    finally:
        await connection.close()


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Runs a benchmark's main coroutine on uvloop (the server's loop too): the load generator
    then costs about half the CPU that the default loop's streams do, CPU the server and
    PostgreSQL share on a small machine."""
    return uvloop.run(main)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]
