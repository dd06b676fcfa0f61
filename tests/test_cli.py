"""The `xray-ingest` command as a user runs it: real processes, signals and databases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests import samples
from tests.samples import dumps

ENV_TO_DROP = ("DATABASE_URL", "XRAY_TEST_DSN", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request(
    port: int, path: str, body: bytes | None = None, timeout_s: float = 10
) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xray_ingest", "serve", "--port", str(self.port)],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.output()
            try:
                if request(self.port, "/health", timeout_s=1)[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, group: bool = False) -> str:
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        output = self.output(timeout_s=60)
        assert self.process.returncode == 0, output
        return output

    def output(self, timeout_s: float = 0) -> str:
        """Waits up to timeout_s for the process to exit (then kills it) and returns its output."""
        try:
            out, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out.decode(errors="replace")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_TO_DROP}
    env.update(extra)
    return env


@pytest.fixture
def project_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def post_batches(port: int, trace_id: str, batches: int, size: int) -> set[str]:
    sent: set[str] = set()
    for _ in range(batches):
        events = [samples.custom(trace_id=trace_id) for _ in range(size)]
        status, body = request(port, "/v1/events/batch", dumps(events))
        assert status == 202, body
        sent |= set(body["ids"])
    return sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_everything_queued_before_exit(
    database_dsn: str, project_dir: Path, sig: signal.Signals
) -> None:
    env = base_env(
        DATABASE_URL=database_dsn,
        XRAY_FLUSH_INTERVAL_MS="60000",
        XRAY_FLUSH_MAX_EVENTS="1000000",
    )
    server = Server(env, project_dir)
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


def test_serve_without_database_url_runs_a_persistent_embedded_postgres(
    project_dir: Path, data_dir: Path
) -> None:
    # Events stay queued until shutdown, so Ctrl-C must drain them into a PostgreSQL still up.
    env = base_env(
        XRAY_DATA_DIR=str(data_dir),
        XRAY_FLUSH_INTERVAL_MS="60000",
        XRAY_FLUSH_MAX_EVENTS="1000000",
    )
    trace_id = str(uuid.uuid4())

    first = Server(env, project_dir)
    assert request(first.port, "/health")[1]["database"] == "ok"
    sent = post_batches(first.port, trace_id, batches=2, size=50)
    # Ctrl-C in a terminal signals the whole process group, embedded PostgreSQL included.
    first.stop(signal.SIGINT, group=True)
    assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "PostgreSQL left running"

    second = Server(env, project_dir)
    status, body = request(second.port, f"/v1/events?trace_id={trace_id}")
    second.stop()
    assert status == 200
    assert {event["span_id"] for event in body["events"]} == sent
