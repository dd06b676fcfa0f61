"""Every endpoint and error path, through the real app (lifespan included) and a real database."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from starlette.testclient import TestClient
from starlette.types import Message

from tests import samples
from tests.samples import dumps
from xray_ingest.allocation import GC_YOUNG_THRESHOLD
from xray_ingest.app import create_app
from xray_ingest.auth import KeyRing
from xray_ingest.config import Settings


def settings_for(dsn: str, **overrides: Any) -> Settings:
    return dataclasses.replace(Settings(database_url=dsn, flush_interval_ms=5), **overrides)


@pytest.fixture
def client(database_dsn: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(database_dsn))) as test_client:
        yield test_client


def test_a_started_worker_collects_garbage_less_often(database_dsn: str) -> None:
    young, *older = gc.get_threshold()
    try:
        gc.set_threshold(700, *older)
        with TestClient(create_app(settings_for(database_dsn))):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)
    finally:
        gc.set_threshold(young, *older)


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def stored_payloads(dsn: str) -> dict[str, dict[str, Any]]:
    rows = await fetch(dsn, "SELECT span_id, data::text AS data FROM events")
    return {str(row["span_id"]): orjson.loads(row["data"]) for row in rows}


def wait_until_stored(client: TestClient, trace_id: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        body = client.get("/v1/events", params={"trace_id": trace_id}).json()
        if body["count"] >= count or time.monotonic() > deadline:
            events: list[dict[str, Any]] = body["events"]
            return events
        time.sleep(0.01)


# ---- health and unknown routes ---------------------------------------------------------------


def test_health_reports_ok_with_the_database_answering(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["database"]) == ("ok", "ok")
    assert body["timestamp"].endswith("Z")


def test_unknown_route_and_wrong_method_answer_json(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    assert client.delete("/v1/events").status_code == 405
    assert "error" in client.delete("/v1/events").json()


# ---- single events ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample", [samples.llm_call, samples.decision, samples.http_request, samples.custom]
)
async def test_each_event_type_is_accepted_and_stored_as_sent(
    database_dsn: str, sample: Any
) -> None:
    event = sample(trace_id=str(uuid.uuid4()), unknown_client_field={"kept": True})
    with TestClient(create_app(settings_for(database_dsn))) as client:
        response = client.post("/v1/events", content=dumps(event))
        assert response.status_code == 202
        assert response.json() == {
            "id": event["span_id"],
            "trace_id": event["trace_id"],
            "message": "Event accepted",
        }
    assert await stored_payloads(database_dsn) == {event["span_id"]: event}


def test_event_without_span_id_gets_one_that_finds_it(client: TestClient) -> None:
    event = samples.decision(trace_id=str(uuid.uuid4()))
    del event["span_id"]
    response = client.post(
        "/v1/events", content=dumps(event), headers={"Authorization": "Bearer sdk-key"}
    )
    assert response.status_code == 202
    span_id = response.json()["id"]
    wait_until_stored(client, event["trace_id"], 1)
    stored = client.get(f"/v1/events/{span_id}")
    assert stored.status_code == 200
    assert stored.json() == {**event, "span_id": span_id}


def test_an_ingest_answer_is_json_with_its_length_and_request_id(client: TestClient) -> None:
    response = client.post("/v1/events", content=dumps(samples.llm_call()))
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/v1/events", "/v1/events/batch"])
def test_a_client_gone_before_its_whole_body_gets_a_400_and_nothing_is_queued(
    client: TestClient, path: str
) -> None:
    messages: Iterator[Message] = iter(
        [
            {"type": "http.request", "body": dumps(samples.llm_call())[:40], "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }

    async def post() -> None:
        await client.app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(post)
    assert sent[0]["status"] == 400
    assert b"disconnected" in sent[1]["body"]
    assert client.get("/health").json()["queue_events"] == 0


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (dumps(samples.llm_call(trace_id="abc")), "$.trace_id"),
        (dumps(samples.decision(decision={"input_count": "ten"})), "$.decision.input_count"),
        (
            dumps({"trace_id": samples.TRACE_ID, "timestamp": "2024-01-03T10:30:00Z"}),
            "$.event_type",
        ),
        (b'{"event_type": "llm_call",', "$"),
        (b"[]", "$"),
        (b"   ", "$"),
    ],
)
def test_bad_single_event_is_a_400_naming_the_field(
    client: TestClient, body: bytes, path: str
) -> None:
    response = client.post("/v1/events", content=body)
    assert response.status_code == 400
    payload = response.json()
    assert isinstance(payload["error"], str)
    assert payload["errors"][0]["path"] == path


# ---- batches ---------------------------------------------------------------------------------


async def test_batch_of_valid_events_is_accepted_in_input_order(database_dsn: str) -> None:
    events = [samples.llm_call(), samples.decision(), samples.http_request(), samples.custom()]
    del events[1]["span_id"]
    with TestClient(create_app(settings_for(database_dsn))) as client:
        response = client.post("/v1/events/batch", json={"events": events})
    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["count"], body["errors"]) == (4, 4, [])
    assert body["ids"][0] == events[0]["span_id"]
    assert body["ids"][2:] == [events[2]["span_id"], events[3]["span_id"]]
    stored = await stored_payloads(database_dsn)
    assert set(stored) == set(body["ids"])
    assert stored[body["ids"][1]] == {**events[1], "span_id": body["ids"][1]}


async def test_batch_with_some_bad_events_is_a_207_keeping_the_good_ones(
    database_dsn: str,
) -> None:
    good = [samples.llm_call(), samples.custom()]
    bad = samples.decision(timestamp="soon")
    with TestClient(create_app(settings_for(database_dsn))) as client:
        response = client.post("/v1/events/batch", json=[good[0], bad, good[1]])
    assert response.status_code == 207
    body = response.json()
    assert body["accepted"] == 1 + 1
    assert body["ids"] == [good[0]["span_id"], None, good[1]["span_id"]]
    assert body["errors"] == [
        {"index": 1, "path": "$.timestamp", "message": "Invalid RFC3339 encoded datetime"}
    ]
    assert set(await stored_payloads(database_dsn)) == {good[0]["span_id"], good[1]["span_id"]}


def test_batch_with_only_bad_events_is_a_400_of_the_same_shape(client: TestClient) -> None:
    response = client.post("/v1/events/batch", json={"events": [{"event_type": "x"}, 5]})
    assert response.status_code == 400
    body = response.json()
    assert (body["accepted"], body["ids"]) == (0, [None, None])
    assert [(e["index"], e["path"]) for e in body["errors"]] == [(0, "$.trace_id"), (1, "$")]


def test_ndjson_batch_is_accepted_line_by_line(client: TestClient) -> None:
    trace_id = str(uuid.uuid4())
    events = [samples.llm_call(trace_id=trace_id), samples.decision(trace_id=trace_id)]
    body = b"\n".join(dumps(e) for e in events) + b"\nnot json\n"
    response = client.post(
        "/v1/events/batch", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 207
    assert response.json()["ids"] == [events[0]["span_id"], events[1]["span_id"], None]
    assert len(wait_until_stored(client, trace_id, 2)) == 2


@pytest.mark.parametrize(
    "body", [b'{"events": []}', b"[]", b'{"evnts": [1]}', b'"events"', b"{oops"]
)
def test_empty_or_malformed_batch_is_a_400(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/events/batch", content=body)
    assert response.status_code == 400
    assert response.json()["errors"][0]["path"].startswith("$")


def test_batch_over_the_event_limit_is_a_413(database_dsn: str) -> None:
    app = create_app(settings_for(database_dsn, max_batch_events=3))
    with TestClient(app) as client:
        response = client.post("/v1/events/batch", json=[samples.custom() for _ in range(4)])
    assert response.status_code == 413
    assert "at most 3" in response.json()["error"]


def test_body_over_the_size_limit_is_a_413_even_without_a_length(database_dsn: str) -> None:
    app = create_app(settings_for(database_dsn, max_body_bytes=1_000))
    body = dumps([samples.llm_call() for _ in range(5)])
    with TestClient(app) as client:
        declared = client.post("/v1/events/batch", content=body)
        streamed = client.post("/v1/events/batch", content=iter([body[:600], body[600:]]))
    assert (declared.status_code, streamed.status_code) == (413, 413)


# ---- queries ---------------------------------------------------------------------------------


def test_trace_events_come_back_in_time_order(client: TestClient) -> None:
    trace_id = str(uuid.uuid4())
    late = samples.custom(trace_id=trace_id, timestamp="2024-01-03T10:31:00Z")
    early = samples.llm_call(trace_id=trace_id, timestamp="2024-01-03T12:30:00+02:00")
    other = samples.custom()
    client.post("/v1/events/batch", json=[late, other, early])
    events = wait_until_stored(client, trace_id, 2)
    assert [e["span_id"] for e in events] == [early["span_id"], late["span_id"]]
    body = client.get("/v1/events", params={"trace_id": trace_id}).json()
    assert (body["trace_id"], body["count"]) == (trace_id, 2)


def test_unknown_trace_has_no_events(client: TestClient) -> None:
    trace_id = str(uuid.uuid4())
    body = client.get("/v1/events", params={"trace_id": trace_id}).json()
    assert body == {"trace_id": trace_id, "count": 0, "events": []}


BAD_PARAMETERS = [
    ("/v1/events", "trace_id"),
    ("/v1/events?trace_id=1", "trace_id"),
    ("/v1/events/not-a-uuid", "span_id"),
    ("/v1/traces?limit=0", "limit"),
    ("/v1/traces?limit=1001", "limit"),
    ("/v1/traces?limit=ten", "limit"),
    ("/v1/traces?cursor=bogus", "cursor"),
]


@pytest.mark.parametrize(("url", "name"), BAD_PARAMETERS)
def test_malformed_parameter_is_a_400_naming_it(client: TestClient, url: str, name: str) -> None:
    response = client.get(url)
    assert response.status_code == 400
    assert response.json()["errors"][0]["path"] == name
    assert name in response.json()["error"]


def test_unknown_span_id_is_a_404(client: TestClient) -> None:
    response = client.get(f"/v1/events/{uuid.uuid4()}")
    assert response.status_code == 404
    assert "error" in response.json()


def test_traces_list_summarises_each_trace(client: TestClient) -> None:
    trace_id = str(uuid.uuid4())
    events = [
        samples.llm_call(trace_id=trace_id, timestamp="2030-01-01T00:00:00Z", duration_ms=500),
        samples.decision(trace_id=trace_id, timestamp="2030-01-01T00:00:02Z", service="b"),
        samples.decision(trace_id=trace_id, timestamp="2030-01-01T00:00:01Z", service="b"),
        samples.custom(trace_id=trace_id, timestamp="2030-01-01T00:00:03Z", duration_ms=250),
    ]
    client.post("/v1/events/batch", json=events)
    wait_until_stored(client, trace_id, 4)
    first = client.get("/v1/traces", params={"limit": 1}).json()["traces"][0]
    assert first == {
        "trace_id": trace_id,
        "start_time": "2030-01-01T00:00:00Z",
        "end_time": "2030-01-01T00:00:03.250000Z",
        "duration_ms": 3250,
        "event_count": 4,
        "services": ["b", "competitor-search-ui"],
        "event_types": {"llm_call": 1, "decision": 2, "cache_lookup": 1},
    }


def test_traces_pages_follow_the_cursor_without_skips_or_repeats(client: TestClient) -> None:
    trace_ids = [str(uuid.uuid4()) for _ in range(7)]
    events = [
        samples.custom(trace_id=trace_id, timestamp=f"2031-01-01T00:00:0{n // 2}Z")
        for n, trace_id in enumerate(trace_ids)
    ]
    client.post("/v1/events/batch", json=events)
    for trace_id in trace_ids:
        wait_until_stored(client, trace_id, 1)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/traces", params=params).json()
        seen += [trace["trace_id"] for trace in page["traces"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    expected = sorted(zip((e["timestamp"] for e in events), trace_ids, strict=True), reverse=True)
    assert seen == [trace_id for _, trace_id in expected]


# ---- queue, shutdown, outage -----------------------------------------------------------------


async def test_events_queued_at_shutdown_are_in_the_table_after(database_dsn: str) -> None:
    settings = settings_for(database_dsn, flush_interval_ms=60_000, flush_max_events=100_000)
    sent: set[str] = set()
    with TestClient(create_app(settings)) as client:
        for _ in range(20):
            batch = [samples.custom() for _ in range(50)]
            assert client.post("/v1/events/batch", json=batch).status_code == 202
            sent |= {event["span_id"] for event in batch}
        assert client.get("/health").json()["queue_events"] == 1000
    assert set(await stored_payloads(database_dsn)) == sent


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nothing"


def open_keyring() -> KeyRing:
    """Keys as read before the database went away: none, so auth is off."""
    keyring = KeyRing(always_required=False)
    keyring.replace([])
    return keyring


def test_database_away_means_degraded_health_and_events_still_queued() -> None:
    settings = settings_for(UNREACHABLE, shutdown_timeout_s=0.1)
    with TestClient(create_app(settings, open_keyring())) as client:
        assert client.post("/v1/events", content=dumps(samples.custom())).status_code == 202
        health = client.get("/health").json()
        assert (health["status"], health["database"]) == ("degraded", "unreachable")
        assert health["queue_events"] == 1


@pytest.mark.parametrize(
    "path", ["/v1/traces", f"/v1/events?trace_id={uuid.uuid4()}", "/v1/analytics/drop-reasons"]
)
def test_reads_while_the_database_is_away_are_503_without_driver_text(path: str) -> None:
    settings = settings_for(UNREACHABLE, shutdown_timeout_s=0.1)
    with TestClient(create_app(settings, open_keyring())) as client:
        response = client.get(path)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json() == {"error": "the database is unavailable; retry shortly"}


def test_full_queue_is_a_503_with_retry_after_and_takes_nothing() -> None:
    settings = settings_for(
        UNREACHABLE, queue_max_events=3, max_batch_events=3, shutdown_timeout_s=0.1
    )
    with TestClient(create_app(settings, open_keyring())) as client:
        assert client.post("/v1/events/batch", json=[samples.custom()] * 2).status_code == 202
        refused = client.post("/v1/events/batch", json=[samples.custom()] * 2)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert client.post("/v1/events", content=dumps(samples.custom())).status_code == 202
        assert client.post("/v1/events", content=dumps(samples.custom())).status_code == 503
        assert client.get("/health").json()["queue_events"] == 3


def test_a_body_that_cannot_fit_the_queue_is_refused_before_it_is_decoded() -> None:
    settings = settings_for(
        UNREACHABLE, queue_max_bytes=2000, max_body_bytes=2000, shutdown_timeout_s=0.1
    )
    with TestClient(create_app(settings, open_keyring())) as client:
        event = dumps(samples.custom())
        assert client.post("/v1/events", content=event).status_code == 202
        # Not even JSON: a 503 rather than a 400 shows it was never decoded.
        too_big = client.post("/v1/events/batch", content=b"x" * (2001 - len(event)))
        assert too_big.status_code == 503
        assert too_big.headers["Retry-After"] == "1"
        fits = client.post("/v1/events/batch", content=b"x" * (2000 - len(event)))
        assert fits.status_code == 400


def test_a_declared_length_that_cannot_fit_is_refused_before_the_body_is_read() -> None:
    settings = settings_for(
        UNREACHABLE, queue_max_bytes=2000, max_body_bytes=2000, shutdown_timeout_s=0.1
    )
    event = dumps(samples.custom())
    sent: list[Message] = []

    async def body_never_comes() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    def scope(length: int, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/events/batch",
            "raw_path": b"/v1/events/batch",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-length", str(length).encode()), *headers],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }

    with TestClient(create_app(settings, open_keyring())) as client:
        assert client.post("/v1/events", content=event).status_code == 202

        async def post(wait_s: float, *headers: tuple[bytes, bytes]) -> None:
            request = scope(2001 - len(event), *headers)
            await asyncio.wait_for(client.app(request, body_never_comes, send), wait_s)

        assert client.portal is not None
        client.portal.call(post, 5)
        assert sent[0]["status"] == 503
        # A compressed body may hold more than its length says: it is read first.
        with pytest.raises(TimeoutError):
            client.portal.call(post, 0.5, (b"content-encoding", b"gzip"))


# ---- issue 3: encodings, durable acks, duplicates, poison, readiness -------------------------


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_compressed_batch_is_accepted(client: TestClient, encoding: str) -> None:
    import gzip

    import zstandard

    trace_id = str(uuid.uuid4())
    body = dumps([samples.custom(trace_id=trace_id) for _ in range(30)])
    compressed = (
        gzip.compress(body) if encoding == "gzip" else zstandard.ZstdCompressor().compress(body)
    )
    response = client.post(
        "/v1/events/batch", content=compressed, headers={"Content-Encoding": encoding}
    )
    assert response.status_code == 202
    assert len(wait_until_stored(client, trace_id, 30)) == 30


def test_unsupported_content_encoding_is_a_415(client: TestClient) -> None:
    response = client.post("/v1/events", content=b"{}", headers={"Content-Encoding": "br"})
    assert response.status_code == 415
    assert "br" in response.json()["error"]


async def test_durable_event_is_in_the_table_when_the_201_arrives(database_dsn: str) -> None:
    # A long flush interval: only the durable path makes the flusher write before it.
    settings = settings_for(database_dsn, flush_interval_ms=200)
    with TestClient(create_app(settings)) as client:
        for params, headers in (({"wait": "true"}, {}), ({}, {"Prefer": "wait=5"})):
            event = samples.decision()
            response = client.post(
                "/v1/events", content=dumps(event), params=params, headers=headers
            )
            assert response.status_code == 201
            assert response.json()["message"] == "Event committed"
            rows = await fetch(
                database_dsn, "SELECT 1 FROM events WHERE span_id = $1", uuid.UUID(event["span_id"])
            )
            assert len(rows) == 1


async def test_durable_batch_reports_the_row_the_database_refused(database_dsn: str) -> None:
    good = [samples.custom(), samples.custom()]
    # Valid JSON that msgspec accepts but jsonb cannot hold: more digits than numeric allows.
    poison = dumps(samples.custom())[:-1] + b',"n":1' + b"0" * 140_000 + b"}"
    body = b"[" + b",".join([dumps(good[0]), poison, dumps(good[1])]) + b"]"
    with TestClient(create_app(settings_for(database_dsn))) as client:
        response = client.post("/v1/events/batch?wait=true", content=body)
    assert response.status_code == 207
    result = response.json()
    assert result["ids"] == [good[0]["span_id"], None, good[1]["span_id"]]
    assert [(e["index"], e["path"]) for e in result["errors"]] == [(1, "$")]
    assert "overflow" not in result["errors"][0]["message"]  # no driver text in answers
    assert set(await stored_payloads(database_dsn)) == {e["span_id"] for e in good}
    dead = await fetch(database_dsn, "SELECT payload, error FROM dead_letter_events")
    assert len(dead) == 1
    assert dead[0]["payload"].encode() == poison
    assert "overflows numeric" in dead[0]["error"]


def test_durable_request_past_its_deadline_is_a_503_with_retry_after() -> None:
    settings = settings_for(UNREACHABLE, durable_timeout_s=0.2, shutdown_timeout_s=0.1)
    with TestClient(create_app(settings, open_keyring())) as client:
        response = client.post("/v1/events?wait=true", content=dumps(samples.custom()))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "retrying the request is safe" in response.json()["error"]


async def test_retried_and_repeated_events_are_stored_once(database_dsn: str) -> None:
    batch = [samples.custom(), samples.decision(), samples.llm_call()]
    with TestClient(create_app(settings_for(database_dsn))) as client:
        first = client.post("/v1/events/batch", json=batch)
        wait_until_stored(client, samples.TRACE_ID, 3)
        retry = client.post("/v1/events/batch?wait=true", json=[*batch, batch[0]])
        single = client.post("/v1/events", content=dumps(batch[1]))
    assert (first.status_code, retry.status_code, single.status_code) == (202, 201, 202)
    assert set(await stored_payloads(database_dsn)) == {e["span_id"] for e in batch}


def test_poison_events_are_per_item_errors_and_the_rest_is_stored(client: TestClient) -> None:
    trace_id = str(uuid.uuid4())
    good = samples.custom(trace_id=trace_id)
    text = dumps(samples.custom(trace_id=trace_id))[:-1]
    items = [
        dumps(good),
        text + rb',"s":"nul \u0000 here"}',
        text + rb',"s":"lone \ud800 surrogate"}',
        dumps(samples.custom(duration_ms=2**31)),
        dumps(samples.custom(service="s" * 256)),
        dumps(samples.custom(data={"n": nested_list(100)})),
    ]
    response = client.post("/v1/events/batch", content=b"\n".join(items), headers=NDJSON)
    assert response.status_code == 207
    body = response.json()
    assert body["ids"] == [good["span_id"]] + [None] * 5
    paths = [e["path"] for e in body["errors"]]
    assert paths == ["$", "$", "$.duration_ms", "$.service", "$"]
    assert [e["span_id"] for e in wait_until_stored(client, trace_id, 1)] == [good["span_id"]]


NDJSON = {"Content-Type": "application/x-ndjson"}


def nested_list(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


async def test_ready_is_200_while_accepting_and_503_once_the_queue_is_full(
    database_dsn: str,
) -> None:
    settings = settings_for(database_dsn, queue_max_events=2, max_batch_events=2)
    blocker = await asyncpg.connect(database_dsn)
    try:
        with TestClient(create_app(settings)) as client:
            ready = client.get("/ready")
            assert (ready.status_code, ready.json()["state"]) == (200, "accepting")
            # A lock holds the flusher's COPY back, so the two events stay queued.
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                client.post("/v1/events/batch", json=[samples.custom(), samples.custom()])
                full = client.get("/ready")
            assert (full.status_code, full.json()["state"]) == (503, "queue full")
            assert full.json()["queue_events"] == 2
    finally:
        await blocker.close()
    assert len(await stored_payloads(database_dsn)) == 2


def test_ready_is_503_while_the_database_is_unreachable() -> None:
    settings = settings_for(UNREACHABLE, shutdown_timeout_s=0.1)
    with TestClient(create_app(settings, open_keyring())) as client:
        ready = client.get("/ready")
        assert (ready.status_code, ready.json()["state"]) == (503, "database unreachable")
        assert client.post("/v1/events", content=dumps(samples.custom())).status_code == 202
