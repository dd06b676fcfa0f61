"""The `xray-ingest` command as a user runs it: real processes, signals and databases."""

from __future__ import annotations

import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.processes import Server, base_env, post_batches, request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_everything_queued_before_exit(
    database_dsn: str, sig: signal.Signals
) -> None:
    env = base_env(
        DATABASE_URL=database_dsn,
        XRAY_FLUSH_INTERVAL_MS="60000",
        XRAY_FLUSH_MAX_EVENTS="1000000",
    )
    server = Server(env)
    trace_id = str(uuid.uuid4())
    sent = post_batches(server.port, trace_id, batches=10, size=100)
    assert request(server.port, "/health")[1]["queue_events"] == 1000
    server.stop(sig)
    connection = await asyncpg.connect(database_dsn)
    try:
        rows = await connection.fetch("SELECT span_id FROM events")
    finally:
        await connection.close()
    assert {str(row["span_id"]) for row in rows} == sent


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Short and under /tmp: PostgreSQL's socket path must stay under ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="xray-cli-") as folder:
        yield Path(folder)


def test_serve_without_database_url_runs_a_persistent_embedded_postgres(data_dir: Path) -> None:
    # Events stay queued until shutdown, so Ctrl-C must drain them into a PostgreSQL still up.
    env = base_env(
        XRAY_DATA_DIR=str(data_dir),
        XRAY_FLUSH_INTERVAL_MS="60000",
        XRAY_FLUSH_MAX_EVENTS="1000000",
    )
    trace_id = str(uuid.uuid4())

    first = Server(env)
    assert request(first.port, "/health")[1]["database"] == "ok"
    sent = post_batches(first.port, trace_id, batches=2, size=50)
    # Ctrl-C in a terminal signals the whole process group, embedded PostgreSQL included.
    first.stop(signal.SIGINT, group=True)
    assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "PostgreSQL left running"

    second = Server(env)
    status, body = request(second.port, f"/v1/events?trace_id={trace_id}")
    second.stop()
    assert status == 200
    assert {event["span_id"] for event in body["events"]} == sent
