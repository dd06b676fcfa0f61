"""The `xray-ingest` command as a user runs it: real processes, signals and databases."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from benchmarks.common import count_events
from tests import samples
from tests.processes import Server, base_env, post_batch_on, post_batches, request, request_text
from tests.samples import dumps


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_everything_queued_before_exit(
    database_dsn: str, sig: signal.Signals, workers: str
) -> None:
    env = base_env(
        DATABASE_URL=database_dsn,
        XRAY_WORKERS=workers,
        XRAY_FLUSH_INTERVAL_MS="60000",
        XRAY_FLUSH_MAX_EVENTS="1000000",
    )
    server = Server(env)
    trace_id = str(uuid.uuid4())
    sent = post_batches(server.port, trace_id, batches=10, size=100)
    assert await count_events(database_dsn) == 0  # all still queued
    # Ctrl-C in a terminal signals the whole group (workers too); a supervisor sends SIGTERM.
    server.stop(sig, group=sig == signal.SIGINT)
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

    second = Server({**env, "XRAY_AUTH_REFRESH_S": "0.2"})
    status, body = request(second.port, f"/v1/events?trace_id={trace_id}")
    assert status == 200
    assert {event["span_id"] for event in body["events"]} == sent
    # `keys` shares the embedded PostgreSQL with the running server and leaves it running.
    created = run_cli(env, "keys", "create", "--name", "local", "--scope", "read")
    assert created.returncode == 0, created.stderr
    deadline = time.monotonic() + 5
    while request(second.port, "/v1/traces")[0] != 401:
        assert time.monotonic() < deadline, "the new key did not turn auth on"
        time.sleep(0.05)
    auth = {"Authorization": f"Bearer {created.stdout.strip()}"}
    assert request(second.port, f"/v1/events?trace_id={trace_id}", headers=auth)[0] == 200
    second.stop()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xray_ingest", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_commands_create_list_and_revoke_for_a_running_server(database_dsn: str) -> None:
    env = base_env(DATABASE_URL=database_dsn, XRAY_AUTH_REFRESH_S="0.2")
    created = run_cli(env, "keys", "create", "--name", "pipeline-a", "--scope", "ingest")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("xr_") and "\n" not in key
    assert "created key 1" in created.stderr and "not shown again" in created.stderr

    listed = run_cli(env, "keys", "list")
    assert listed.returncode == 0
    assert "pipeline-a" in listed.stdout and "ingest" in listed.stdout
    assert key[:8] in listed.stdout and key not in listed.stdout

    server = Server(env)
    event = dumps(samples.custom())
    auth = {"Authorization": f"Bearer {key}"}
    assert request(server.port, "/v1/events", event, headers=auth)[0] == 202
    assert request(server.port, "/v1/traces", headers=auth)[0] == 403
    assert request(server.port, "/v1/events", event)[0] == 401

    revoked = run_cli(env, "keys", "revoke", "1")
    assert revoked.returncode == 0 and "revoked key 1" in revoked.stdout
    deadline = time.monotonic() + 5
    while request(server.port, "/v1/events", event, headers=auth)[0] != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.05)
    server.stop()
    assert "revoked" in run_cli(env, "keys", "list").stdout.splitlines()[0]
    assert run_cli(env, "keys", "revoke", "1").returncode == 1  # not active any more
    assert run_cli(env, "keys", "create", "--name", "x", "--scope", "root").returncode == 2


def test_two_workers_share_connections_evenly(database_dsn: str) -> None:
    """A pool's burst of 8 connections is split 4 / 4 (uvicorn's own accept gave one worker all
    8, 20 bursts out of 20), and connections opened after one worker's closed go to that one."""
    server = Server(base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="2"))

    def open_connections(count: int) -> list[http.client.HTTPConnection]:
        opened = [
            http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(count)
        ]
        for connection in opened:
            connection.connect()
        for connection in opened:  # accepted by then, and answered
            connection.request("GET", "/health")
            assert connection.getresponse().read()
        return opened

    def shares() -> list[int]:
        return sorted(len(ports) for ports in server.client_ports_by_worker().values() if ports)

    def wait_for_shares(expected: list[int]) -> None:
        deadline = time.monotonic() + 5
        while shares() != expected:
            assert time.monotonic() < deadline, shares()
            time.sleep(0.01)

    # The readiness checks' connections, closed by the client, until their workers let them go.
    wait_for_shares([])
    burst = open_connections(8)
    assert shares() == [4, 4]
    by_worker = [ports for ports in server.client_ports_by_worker().values() if ports]
    for connection in burst:
        if connection.sock.getsockname()[1] in by_worker[0]:
            connection.close()
    wait_for_shares([4])
    later = open_connections(4)
    assert shares() == [4, 4]
    for connection in [*burst, *later]:
        connection.close()
    server.stop()


def test_two_workers_log_json_and_report_metrics_summed_over_both(database_dsn: str) -> None:
    env = base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="2", XRAY_LOG_FORMAT="json")
    server = Server(env)
    trace_id = str(uuid.uuid4())
    posted = 0
    # 20 batches on a connection held by each worker. (Connections opened one after another,
    # each closed before the next, could all go to one worker: each time both hold none.)
    for connection in server.connection_to_each_worker():
        for _ in range(20):
            posted += len(post_batch_on(connection, trace_id, size=5))
        connection.close()
    # Request metrics reach a scrape by the other worker within a second (metrics.RequestTally):
    # one connection, so one worker answers every scrape, and the other's requests (both took
    # some: checked below) reach it only through that worker's periodic flush.
    batch_requests = re.compile(
        r'^xray_http_requests_total\{method="POST",route="/v1/events/batch",status="202"\} (\S+)$',
        re.MULTILINE,
    )
    scraper = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    deadline = time.monotonic() + 5
    while True:
        scraper.request("GET", "/metrics")
        counted = batch_requests.search(scraper.getresponse().read().decode())
        if (counted and float(counted[1]) == 40) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    scraper.close()
    assert counted and float(counted[1]) == 40
    scrapes = [request_text(server.port, "/metrics") for _ in range(10)]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as answer:
        headers = answer.headers
    output = server.stop()
    # HTTP's Date, but not uvicorn's name (server_header=False).
    assert "Date" in headers and "Server" not in headers
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    posting_pids = {
        line["pid"]
        for line in lines
        if line.get("action") == "access" and line["route"] == "/v1/events/batch"
    }
    assert len(posting_pids) == 2, "both workers should have taken events"
    for text in scrapes:
        match = re.search(r"^xray_events_accepted_total (\S+)$", text, re.MULTILINE)
        assert match and float(match.group(1)) == posted
