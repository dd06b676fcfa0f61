"""Nothing acknowledged is lost: real server processes under load against a PostgreSQL that the
test itself stops and restarts, SIGTERM and kill -9 mid-load, and memory with the database away."""

from __future__ import annotations

import asyncio
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from benchmarks.common import with_database
from tests.processes import Loader, Server, base_env, request, request_text
from xray_ingest.embedded import start_embedded_postgres
from xray_ingest.migrate import migrate


class Cluster:
    """A throwaway PostgreSQL of the test's own, which it can stop and start again."""

    def __init__(self, folder: Path) -> None:
        self.server, server_dsn = start_embedded_postgres(folder / "pgdata", throwaway=True)
        self.dsn = with_database(server_dsn, "postgres")

    def stop(self, mode: str = "fast") -> None:
        """Stops the server: `fast` shuts down cleanly; `immediate` ends every process at once,
        as a crash does (what is in the WAL buffers is lost, and the next start recovers)."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="xray-outage-") as folder:
        cluster = Cluster(Path(folder))
        asyncio.run(migrate(cluster.dsn))
        try:
            yield cluster
        finally:
            cluster.server.cleanup()


async def stored_span_ids(dsn: str) -> set[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT span_id FROM events")
    finally:
        await connection.close()
    return {str(row["span_id"]) for row in rows}


async def wait_until_stored(dsn: str, expected: set[str], timeout_s: float = 90) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        stored = await stored_span_ids(dsn)
        if expected <= stored or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.2)


def wait_for_health(port: int, status: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = request(port, "/health")[1]
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, f"health never became {status}: {body}"
        time.sleep(0.1)


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"], ids=["stopped", "crashed"])
async def test_events_accepted_during_a_database_outage_all_land_once_it_is_back(
    cluster: Cluster, stop_mode: str
) -> None:
    server = Server(base_env(DATABASE_URL=cluster.dsn))
    loader = Loader(server.port, threads=3)
    time.sleep(1.0)
    cluster.stop(stop_mode)
    acked_before_outage = len(loader.acked)
    assert wait_for_health(server.port, "degraded")["database"] == "unreachable"
    time.sleep(2.0)
    acked_during_outage = len(loader.acked) - acked_before_outage
    # Unready, so a load balancer prefers another instance; events posted here still queue.
    status, readiness = request(server.port, "/ready")
    assert (status, readiness["state"]) == (503, "database unreachable")
    cluster.start()
    wait_for_health(server.port, "ok")
    time.sleep(0.5)
    acked = loader.stop()
    stored = await wait_until_stored(cluster.dsn, acked)
    server.stop()
    print(
        f"\noutage ({stop_mode}): acked {len(acked)} events ({acked_during_outage} while the"
        f" database was down), committed {len(stored)}; answers {dict(loader.statuses)}"
    )
    assert acked_during_outage > 0
    assert stored == acked


def queued_events(port: int) -> int:
    """Events queued in all workers together (the xray_queue_events gauge)."""
    match = re.search(r"^xray_queue_events (\S+)$", request_text(port, "/metrics"), re.MULTILINE)
    assert match
    return int(float(match.group(1)))


async def test_memory_stays_bounded_while_the_database_is_down(cluster: Cluster) -> None:
    env = base_env(
        DATABASE_URL=cluster.dsn,
        XRAY_QUEUE_MAX_BYTES=str(16 * 1024 * 1024),
        XRAY_MAX_BODY_BYTES=str(1024 * 1024),
    )
    server = Server(env)
    cluster.stop()
    loader = Loader(server.port, threads=4, size=200)
    deadline = time.monotonic() + 120
    # Keep pushing well past the point where the queue is full.
    while loader.statuses[503] < 500:
        assert time.monotonic() < deadline, dict(loader.statuses)
        time.sleep(0.1)
    peak_mib = server.peak_rss_mib()
    acked = loader.stop()
    time.sleep(1.5)  # every worker samples its queue gauge once a second
    queued = queued_events(server.port)
    print(
        f"\ndatabase down: peak RSS {peak_mib:.1f} MiB with {queued} events "
        f"({len(acked)} acked) queued under a 16 MiB bound; answers {dict(loader.statuses)}"
    )
    assert request(server.port, "/ready")[0] == 503
    assert peak_mib < 200
    assert queued == len(acked)
    cluster.start()
    assert await wait_until_stored(cluster.dsn, acked) == acked
    server.stop()


async def test_sigterm_under_load_commits_everything_acknowledged(database_dsn: str) -> None:
    server = Server(base_env(DATABASE_URL=database_dsn))
    loader = Loader(server.port, threads=4, size=50)
    time.sleep(1.5)
    server.stop(signal.SIGTERM)
    acked = loader.stop()
    stored = await stored_span_ids(database_dsn)
    print(f"\nSIGTERM: acked {len(acked)}, committed {len(stored)}; {dict(loader.statuses)}")
    assert acked
    assert stored == acked


async def test_kill_9_in_durable_mode_loses_no_event_that_got_a_201(database_dsn: str) -> None:
    server = Server(base_env(DATABASE_URL=database_dsn))
    loader = Loader(server.port, threads=6, size=20, durable=True)
    time.sleep(1.5)
    server.kill()
    server.output(timeout_s=10)
    acked = loader.stop()
    stored = await stored_span_ids(database_dsn)
    print(f"\nkill -9: 201 for {len(acked)}, stored {len(stored)}; {dict(loader.statuses)}")
    assert loader.statuses[201] > 0
    assert acked <= stored
