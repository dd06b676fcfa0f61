"""Ingest POSTs answered in the HTTP protocol (protocol.HttpProtocol with
routes.IngestLane.accept_plain): over a real socket to a real server, they must be answered as the
app answers them, in order, counted and logged, and everything the protocol declines must get the
app's own answer."""

from __future__ import annotations

import gzip
import json
import re
import signal
import socket
import time
import uuid
from typing import Any

import asyncpg

from tests import samples
from tests.processes import Server, base_env, request_text
from tests.samples import dumps


class Connection:
    """One keep-alive HTTP/1.1 connection, raw: what is sent is exactly what is written."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], Any]:
        """The next response: status, headers (names in lower case) and the decoded JSON."""
        while b"\r\n\r\n" not in self.pending:
            self.pending += self._read()
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.pending) < length:
            self.pending += self._read()
        body, self.pending = self.pending[:length], self.pending[length:]
        return int(status_line.split()[1]), headers, json.loads(body)

    def _read(self) -> bytes:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        return data

    def is_closed_by_server(self) -> bool:
        return not self.pending and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def post(
    body: bytes,
    path: bytes = b"/v1/events",
    headers: bytes = b"",
    content_type: bytes = b"application/json",
) -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        + content_type
        + b"\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def posts_counted(port: int, route: str) -> dict[str, float]:
    """The server's count of POSTs to route, by status, from its /metrics."""
    labels = rf'method="POST",route="{re.escape(route)}",status="(\d+)"'
    line = rf"xray_http_requests_total\{{{labels}\}} (\S+)"
    found = re.findall(line, request_text(port, "/metrics"))
    return {status: float(value) for status, value in found}


async def stored_span_ids(dsn: str, expected: int) -> set[str]:
    """The span_ids in events once at least `expected` rows are there (10 s at most)."""
    connection = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 10
        while True:
            rows = await connection.fetch("SELECT span_id::text FROM events")
            if len(rows) >= expected or time.monotonic() > deadline:
                return {row[0] for row in rows}
            time.sleep(0.05)
    finally:
        await connection.close()


async def test_plain_posts_are_answered_as_the_app_answers_them(database_dsn: str) -> None:
    server = Server(base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="1"))
    connection = Connection(server.port)
    try:
        event = samples.custom()
        connection.send(post(dumps(event)))
        status, headers, body = connection.response()
        assert status == 202
        assert body == {
            "id": event["span_id"],
            "trace_id": event["trace_id"],
            "message": "Event accepted",
        }
        assert headers["content-type"] == "application/json"
        assert re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"])
        assert "date" in headers

        # The same request the ASGI way (a query string takes it there): the same answer.
        other = samples.custom()
        connection.send(post(dumps(other), path=b"/v1/events?source=test"))
        asgi_status, asgi_headers, asgi_body = connection.response()
        assert (asgi_status, set(asgi_headers)) == (status, set(headers))
        assert asgi_body == {**body, "id": other["span_id"]}

        # The caller's request id is kept.
        third = samples.custom()
        connection.send(post(dumps(third), headers=b"X-Request-ID: caller-id.1\r\n"))
        assert connection.response()[1]["x-request-id"] == "caller-id.1"

        # Declined here, answered by the app: an invalid event, an empty body.
        connection.send(post(dumps(samples.custom(trace_id=5))))
        status, _, body = connection.response()
        assert status == 400
        assert body["errors"][0]["path"] == "$.trace_id"
        connection.send(post(b""))
        status, _, body = connection.response()
        assert status == 400 and "empty" in body["error"]

        # Not plain, so the app's own path: durable, compressed.
        durable = samples.custom()
        connection.send(post(dumps(durable), headers=b"Prefer: wait\r\n"))
        status, _, body = connection.response()
        assert (status, body["message"]) == (201, "Event committed")
        zipped = samples.custom()
        connection.send(post(gzip.compress(dumps(zipped)), headers=b"Content-Encoding: gzip\r\n"))
        assert connection.response()[0] == 202

        # Pipelined in one write: plain, app, plain; answered in order.
        first, second = samples.custom(), samples.custom()
        health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        connection.send(post(dumps(first)) + health + post(dumps(second)))
        answers = [connection.response() for _ in range(3)]
        assert [a[0] for a in answers] == [202, 200, 202]
        assert [answers[0][2]["id"], answers[2][2]["id"]] == [first["span_id"], second["span_id"]]

        accepted = [event, other, third, durable, zipped, first, second]
        stored = await stored_span_ids(database_dsn, len(accepted))
        assert stored == {e["span_id"] for e in accepted}

        # Counted as the app counts them: seven 202/201 and two 400 on the route.
        assert posts_counted(server.port, "/v1/events") == {"202": 6.0, "201": 1.0, "400": 2.0}
    finally:
        connection.close()
        output = server.stop()
    # Logged as the app logs them, the caller's id included.
    assert "POST /v1/events 202" in output
    assert "request_id=caller-id.1" in output


async def test_plain_batches_are_answered_as_the_app_answers_them(database_dsn: str) -> None:
    server = Server(base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="1"))
    connection = Connection(server.port)
    batch_path = b"/v1/events/batch"
    try:
        # Plain, then the same request the ASGI way (a query string takes it there).
        plain, asgi = [samples.llm_call(), samples.decision()], [samples.custom()]
        connection.send(post(dumps({"events": plain}), path=batch_path))
        connection.send(post(dumps({"events": asgi}), path=batch_path + b"?source=test"))
        (status, headers, body), (asgi_status, asgi_headers, asgi_body) = [
            connection.response() for _ in range(2)
        ]
        assert (status, asgi_status) == (202, 202)
        assert set(headers) == set(asgi_headers)
        assert body == {
            "accepted": 2,
            "count": 2,
            "ids": [e["span_id"] for e in plain],
            "errors": [],
            "message": "2 events accepted",
        }
        expected = {"accepted": 1, "count": 1, "message": "1 events accepted"}
        assert asgi_body == {**body, **expected, "ids": [asgi[0]["span_id"]]}

        # NDJSON, and per-item errors: both ways alike.
        lines = [samples.custom(), samples.custom()]
        connection.send(
            post(
                b"\n".join(dumps(e) for e in lines),
                path=batch_path,
                content_type=b"application/x-ndjson",
            )
        )
        ndjson_answer = connection.response()
        assert ndjson_answer[2]["ids"] == [e["span_id"] for e in lines], ndjson_answer
        partial = [samples.custom(), {"event_type": "x"}]
        connection.send(post(dumps(partial), path=batch_path))
        connection.send(post(dumps([partial[0], partial[1]]), path=batch_path + b"?source=t"))
        plain_partial, asgi_partial = connection.response(), connection.response()
        assert plain_partial[0] == asgi_partial[0] == 207
        assert plain_partial[2]["errors"] == asgi_partial[2]["errors"]
        assert plain_partial[2]["errors"][0]["path"] == "$.trace_id"
        connection.send(post(dumps([{"event_type": "x"}]), path=batch_path))
        assert connection.response()[0] == 400

        # Declined here, answered by the app: no batch, an empty one, too many events.
        connection.send(post(b'{"events": "none"}', path=batch_path))
        status, _, body = connection.response()
        assert status == 400 and body["error"].startswith("invalid batch")
        connection.send(post(b"[]", path=batch_path))
        assert connection.response()[2]["error"] == "batch is empty"

        stored = await stored_span_ids(database_dsn, 6)
        assert stored == {e["span_id"] for e in plain + asgi + lines + partial[:1]}

        counted = posts_counted(server.port, "/v1/events/batch")
        assert counted == {"202": 3.0, "207": 2.0, "400": 3.0}
    finally:
        connection.close()
        output = server.stop()
    assert "POST /v1/events/batch 207" in output


async def test_plain_posts_get_the_apps_refusals(database_dsn: str) -> None:
    # Auth required and no key: 401 from the app, with its header.
    server = Server(base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="1", XRAY_AUTH="required"))
    connection = Connection(server.port)
    try:
        connection.send(post(dumps(samples.custom())))
        status, headers, _ = connection.response()
        assert status == 401 and headers["www-authenticate"] == "Bearer"
    finally:
        connection.close()
        server.stop()
    # A full queue: 503 with Retry-After, and the event is not taken.
    env = base_env(
        DATABASE_URL=database_dsn,
        XRAY_WORKERS="1",
        XRAY_QUEUE_MAX_EVENTS="1000",
        XRAY_MAX_BATCH_EVENTS="1000",
        XRAY_FLUSH_INTERVAL_MS="60000",
        XRAY_FLUSH_MAX_EVENTS="1000000",
    )
    server = Server(env)
    connection = Connection(server.port)
    try:
        batch = [samples.custom() for _ in range(1000)]
        connection.send(post(dumps(batch), path=b"/v1/events/batch"))
        assert connection.response()[0] == 202
        refused = samples.custom()
        connection.send(post(dumps(refused)))
        status, headers, _ = connection.response()
        assert status == 503 and "retry-after" in headers
        connection.send(post(dumps([refused]), path=b"/v1/events/batch"))
        status, headers, _ = connection.response()
        assert status == 503 and "retry-after" in headers
    finally:
        connection.close()
        server.stop()  # drains the queue
    stored = await stored_span_ids(database_dsn, 1000)
    assert stored == {e["span_id"] for e in batch}
    # A body past a body limit set below what the protocol would read: 413 from the app.
    server = Server(
        base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="1", XRAY_MAX_BODY_BYTES="300")
    )
    connection = Connection(server.port)
    try:
        connection.send(post(dumps(samples.custom(data={"text": "x" * 400}))))
        assert connection.response()[0] == 413
        connection.send(post(dumps(samples.custom())))
        assert connection.response()[0] == 202
    finally:
        connection.close()
        server.stop()


async def test_a_plain_post_being_read_at_shutdown_is_answered_then_closed(
    database_dsn: str,
) -> None:
    server = Server(base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="1"))
    connection = Connection(server.port)
    try:
        event = dumps(samples.custom(span_id=str(uuid.uuid4())))
        request = post(event)
        connection.send(request[:-10])
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        connection.send(request[-10:])
        status, headers, _ = connection.response()
        # No longer taking events: the app's 503; and the connection is closed after it.
        assert status == 503 and "retry-after" in headers
        assert connection.is_closed_by_server()
    finally:
        connection.close()
        output = server.output(timeout_s=60)
    assert server.process.returncode == 0, output


async def test_a_request_after_a_plain_post_in_the_same_read_is_not_cut_off_as_idle(
    database_dsn: str,
) -> None:
    # uvicorn closes a connection idle for 5 s (its keep-alive timeout), on a timer a plain
    # answer arms. A durable request right behind it, held up for longer by a lock on events,
    # must still get its answer.
    server = Server(base_env(DATABASE_URL=database_dsn, XRAY_WORKERS="1"))
    connection = Connection(server.port)
    locker = await asyncpg.connect(database_dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            held = dumps(samples.custom())
            connection.send(post(dumps(samples.custom())) + post(held, headers=b"Prefer: wait\r\n"))
            assert connection.response()[0] == 202
            time.sleep(6)
        status, _, body = connection.response()
        assert (status, body["message"]) == (201, "Event committed")
    finally:
        await locker.close()
        connection.close()
        server.stop()
