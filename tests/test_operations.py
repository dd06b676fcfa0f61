"""What an operator sees: safe 500s with a request id, access logs (JSON too), Prometheus
metrics, CORS, and the OpenAPI document checked against real requests and answers."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from starlette.routing import Route
from starlette.testclient import TestClient

from tests import samples
from tests.samples import dumps
from tests.test_routes import settings_for, wait_until_stored
from xray_ingest import db, metrics, routes
from xray_ingest.app import create_app
from xray_ingest.buffer import Buffer
from xray_ingest.errors import XrayError
from xray_ingest.logconfig import JsonFormatter
from xray_ingest.metrics import forget_dead_workers
from xray_ingest.models import decode_row
from xray_ingest.openapi import OPERATIONS, openapi_json

SECRET = "SELECT prompt FROM events WHERE x = 'leak' -- /srv/xray/db.py line 12"


@pytest.fixture
def client(database_dsn: str) -> Iterator[TestClient]:
    app = create_app(settings_for(database_dsn))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError(SECRET), XrayError(SECRET), OSError(SECRET)])
def test_a_500_says_only_that_something_failed_and_the_request_id(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    async def failing(*args: Any) -> None:
        raise error

    monkeypatch.setattr(db, "fetch_traces_page", failing)
    with caplog.at_level(logging.ERROR):
        response = client.get("/v1/traces")
    assert response.status_code == 500
    body = response.json()
    assert set(body) == {"error", "request_id"}
    assert body["error"] == "internal server error"
    assert "leak" not in response.text and "Traceback" not in response.text
    assert response.headers["X-Request-ID"] == body["request_id"]
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == body["request_id"]]
    assert logged and logged[0].exc_info is not None  # the details are in the log


@pytest.mark.parametrize("error", [RuntimeError(SECRET), XrayError(SECRET)])
@pytest.mark.parametrize(
    ("path", "decoder", "body"),
    [
        ("/v1/events", "decode_row", dumps(samples.llm_call())),
        ("/v1/events/batch", "decode_batch", dumps({"events": [samples.llm_call()]})),
    ],
)
def test_an_ingest_500_says_only_that_something_failed_and_the_request_id(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    path: str,
    decoder: str,
    body: bytes,
) -> None:
    # Most ingest POSTs skip Starlette's middleware stack and router (routes.IngestLane).
    def failing(*args: Any) -> None:
        raise error

    monkeypatch.setattr(routes, decoder, failing)
    with caplog.at_level(logging.ERROR):
        response = client.post(path, content=body)
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal server error",
        "request_id": response.headers["X-Request-ID"],
    }
    logged = [r for r in caplog.records if getattr(r, "request_id", None)]
    assert logged and logged[0].exc_info is not None


def test_every_response_carries_a_request_id_and_keeps_a_plain_one_from_the_caller(
    client: TestClient,
) -> None:
    first, second = client.get("/health"), client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{16}", first.headers["X-Request-ID"])
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    kept = client.get("/health", headers={"X-Request-ID": "lb-1234.abc"})
    assert kept.headers["X-Request-ID"] == "lb-1234.abc"
    replaced = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert replaced.headers["X-Request-ID"] != "bad id\twith spaces"


def test_ingest_refusals_and_errors_name_the_request_id_and_are_counted(
    database_dsn: str,
) -> None:
    # Most ingest POSTs come in ahead of the middleware (routes.IngestLane), which must give
    # every answer its request id and count it as ObserveMiddleware does for the rest.
    body = dumps(samples.llm_call())
    with TestClient(create_app(settings_for(database_dsn))) as client:
        before = client.get("/metrics").text
        # Metrics belong to the process: the locked app's count is written when it stops.
        with TestClient(create_app(settings_for(database_dsn, auth="required"))) as locked:
            refused = locked.post("/v1/events", content=body, headers={"X-Request-ID": "lb-7"})
        invalid = client.post("/v1/events", content=b'{"trace_id": "nope"}')
        not_json = client.post("/v1/events/batch", content=b"{", headers={"X-Request-ID": "c-1"})
        text = client.get("/metrics").text
    assert refused.status_code == 401 and refused.headers["X-Request-ID"] == "lb-7"
    assert invalid.status_code == 400 and re.fullmatch(
        r"[0-9a-f]{16}", invalid.headers["X-Request-ID"]
    )
    assert not_json.status_code == 400 and not_json.headers["X-Request-ID"] == "c-1"
    unauthorized = 'method="POST",route="/v1/events",status="401"'
    assert metric(text, "xray_http_requests_total", unauthorized) == 1 + metric(
        before, "xray_http_requests_total", unauthorized
    )


# ---- logs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_access_line_per_request_without_payload_query_or_key(
    database_dsn: str, capsys: pytest.CaptureFixture[str], log_format: str
) -> None:
    event = samples.llm_call()
    capsys.readouterr()
    with TestClient(create_app(settings_for(database_dsn, log_format=log_format))) as client:
        response = client.post(
            "/v1/events?secret_query=1",
            content=dumps(event),
            headers={"Authorization": "Bearer xr_not_a_real_key"},
        )
        client.get("/v1/nothing-here")
    request_id = response.headers["X-Request-ID"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "xray_ingest.access" in line]
    assert len(lines) == 2
    if log_format == "json":
        first, second = (json.loads(line) for line in lines)
        fields = {k: first[k] for k in ("request_id", "method", "route", "status", "logger")}
        assert fields == {
            "request_id": request_id,
            "method": "POST",
            "route": "/v1/events",
            "status": 202,
            "logger": "xray_ingest.access",
        }
        assert first["ms"] >= 0 and first["time"].endswith("+00:00")
        assert (second["route"], second["status"]) == ("unmatched", 404)
    else:
        assert re.search(
            rf" INFO xray_ingest.access: POST /v1/events 202 [0-9.]+ms request_id={request_id}$",
            lines[0],
        )
        assert " GET unmatched 404 " in lines[1]
    for secret in ("secret_query", "xr_not_a_real_key", event["input"]["raw_prompt"][:20]):
        assert secret not in "\n".join(lines)


def test_access_lines_can_be_turned_off(
    database_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with TestClient(create_app(settings_for(database_dsn, access_log=False))) as client:
        client.get("/health")
    assert "xray_ingest.access" not in capsys.readouterr().err


def test_json_log_lines_carry_the_extra_fields_and_the_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("xray_ingest.test_json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("flushed %d events", 3, extra={"action": "flush", "rows": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"request_id": "abc"})
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message", "action", "rows")} == {
        "level": "WARNING",
        "logger": "xray_ingest.test_json",
        "message": "flushed 3 events",
        "action": "flush",
        "rows": 3,
    }
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == "abc" and "ValueError: boom" in second["exception"]


# ---- metrics ---------------------------------------------------------------------------------


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text exposition; 0 when it is not there yet."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for_metric(client: TestClient, name: str, value: float) -> str:
    deadline = time.monotonic() + 5
    while True:
        text = client.get("/metrics").text
        if metric(text, name) >= value or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def test_metrics_count_requests_events_and_flushes(client: TestClient) -> None:
    # Metrics belong to the process, so earlier tests count too: compare before and after.
    before = client.get("/metrics").text
    good = [samples.custom() for _ in range(5)]
    batch = client.post("/v1/events/batch", content=dumps([*good, {"event_type": "x"}]))
    assert batch.status_code == 207
    client.post("/v1/events", content=b'{"trace_id": "nope"}')
    client.get(f"/v1/events/{uuid.uuid4()}")
    committed = metric(before, "xray_events_committed_total") + 5
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = wait_for_metric(client, "xray_events_committed_total", committed)

    def grew(name: str, labels: str = "") -> float:
        return metric(text, name, labels) - metric(before, name, labels)

    assert grew("xray_events_accepted_total") == 5
    assert grew("xray_events_rejected_total") == 2
    assert grew("xray_events_committed_total") == 5
    assert grew("xray_http_requests_total", 'method="POST",route="/v1/events/batch",status="207"')
    assert grew("xray_http_requests_total", 'method="POST",route="/v1/events",status="400"') == 1
    not_found = 'method="GET",route="/v1/events/{span_id}",status="404"'
    assert grew("xray_http_requests_total", not_found) == 1
    latency = 'le="+Inf",route="/v1/events/batch"'
    assert grew("xray_http_request_duration_seconds_bucket", latency) == 1
    assert grew("xray_flush_batch_events_count") >= 1
    assert grew("xray_flush_duration_seconds_count") >= 1
    assert grew("xray_flush_batch_events_sum") == 5
    assert metric(text, "xray_db_pool_connections") >= 1
    for name in ("queue_events", "queue_bytes", "db_pool_in_use", "copy_errors_total"):
        assert f"\nxray_{name} " in text
    for name in ("copy_retries_total", "events_dead_lettered_total", "events_duplicate_total"):
        assert f"\nxray_{name} " in text


def test_a_scrape_skips_the_empty_file_of_a_starting_worker(tmp_path: Path) -> None:
    # One worker's counter file with a value in it, and the file another worker has created
    # but not yet sized (prometheus-client makes it in two steps).
    written = MmapedDict(str(tmp_path / "counter_101.db"))  # type: ignore[no-untyped-call]
    key = mmap_key("xray_events_committed", "xray_events_committed_total", [], [], "Events")
    written.write_value(key, 42.0, 0.0)  # type: ignore[no-untyped-call]
    written.close()  # type: ignore[no-untyped-call]
    (tmp_path / "counter_102.db").touch()
    text = metrics.exposition(tmp_path).decode()
    assert metric(text, "xray_events_committed_total") == 42.0


def test_the_events_a_queue_accepted_are_written_to_the_counter_once_each() -> None:
    buffer = Buffer(max_events=100, max_bytes=10_000)
    tally = metrics.RequestTally(metrics.REQUESTS, metrics.REQUEST_SECONDS)
    rows = [decode_row(dumps(samples.custom())) for _ in range(5)]

    def counted() -> float:
        return REGISTRY.get_sample_value("xray_events_accepted_total") or 0.0

    before = counted()
    buffer.put(rows[:3], 30)
    assert counted() == before  # counted in Python until written out
    metrics.write_tallies(buffer, tally)
    buffer.put(rows[3:], 20)
    metrics.write_tallies(buffer, tally)
    metrics.write_tallies(buffer, tally)
    assert counted() == before + 5


def test_the_request_tally_writes_what_counting_each_request_would() -> None:
    registry = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1)
    tallied = (
        Counter("tallied_requests", "", ["route", "method", "status"], registry=registry),
        Histogram("tallied_seconds", "", ["route"], buckets=buckets, registry=registry),
    )
    direct = (
        Counter("direct_requests", "", ["route", "method", "status"], registry=registry),
        Histogram("direct_seconds", "", ["route"], buckets=buckets, registry=registry),
    )
    tally = metrics.RequestTally(*tallied)
    # On a bucket's bound (which it holds), between bounds, past the last, twice the same.
    requests = [("/a", "POST", 202, 0.001), ("/a", "POST", 202, 0.0011), ("/b", "GET", 404, 5.0)]
    requests += [("/a", "POST", 400, 0.05), ("/a", "POST", 202, 0.0011)]
    for number, (route, method, status, seconds) in enumerate(requests):
        tally.add(route, method, status, seconds)
        direct[0].labels(route, method, str(status)).inc()
        direct[1].labels(route).observe(seconds)
        if number == 2:
            tally.flush()  # a flush in between, and nothing counted twice
    tally.flush()
    tally.flush()
    lines = generate_latest(registry).decode().splitlines()
    samples_of = {
        prefix: sorted(
            line.removeprefix(prefix)
            for line in lines
            if line.startswith(prefix) and "_created" not in line  # when each series began
        )
        for prefix in ("tallied_", "direct_")
    }
    assert samples_of["tallied_"] == samples_of["direct_"]
    assert 'requests_total{method="POST",route="/a",status="202"} 3.0' in samples_of["direct_"]


def test_unknown_methods_do_not_make_new_metric_labels(client: TestClient) -> None:
    client.request("BREW", "/v1/events")
    assert 'method="BREW"' not in client.get("/metrics").text


# ---- CORS ------------------------------------------------------------------------------------


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/v1/events",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins(database_dsn: str) -> None:
    settings = settings_for(database_dsn, cors_origins=("https://ui.example",))
    with TestClient(create_app(settings)) as client:
        allowed = client.options(
            "/v1/events",
            headers={
                "Origin": "https://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "Authorization, Content-Type",
            },
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        denied = client.options(
            "/v1/events",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert denied.status_code == 400
        simple = client.get("/health", headers={"Origin": "https://ui.example"})
        assert simple.headers["access-control-allow-origin"] == "https://ui.example"


def test_a_browsers_ingest_post_gets_cors_headers_and_an_sdks_gets_none(database_dsn: str) -> None:
    # A POST with an Origin goes through CORSMiddleware; one without it takes the ingest lane.
    settings = settings_for(database_dsn, cors_origins=("https://ui.example",))
    with TestClient(create_app(settings)) as client:
        body = dumps(samples.llm_call())
        browser = client.post("/v1/events", content=body, headers={"Origin": "https://ui.example"})
        sdk = client.post("/v1/events", content=dumps(samples.llm_call()))
    assert browser.status_code == sdk.status_code == 202
    assert browser.headers["access-control-allow-origin"] == "https://ui.example"
    assert "X-Request-ID" in browser.headers["access-control-expose-headers"]
    assert browser.headers["X-Request-ID"] and sdk.headers["X-Request-ID"]
    assert "access-control-allow-origin" not in sdk.headers


# ---- OpenAPI ---------------------------------------------------------------------------------


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(openapi_json())
    return loaded


def schema_validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """Validates against a schema of the document, its $refs resolved within the document."""
    return jsonschema.Draft202012Validator({**schema, "components": document()["components"]})


def request_schema(method: str, path: str, media: str = "application/json") -> dict[str, Any]:
    schema: dict[str, Any] = document()["paths"][path][method]["requestBody"]["content"][media][
        "schema"
    ]
    return schema


def response_schema(method: str, path: str, status: int) -> dict[str, Any]:
    answer = document()["paths"][path][method]["responses"][str(status)]
    schema: dict[str, Any] = answer["content"]["application/json"]["schema"]
    return schema


def test_the_document_is_valid_openapi_3_1_and_names_every_route(client: TestClient) -> None:
    served = client.get("/openapi.json").json()
    assert served == document()
    assert served["openapi"].startswith("3.1")
    validate(served)
    routes = {
        (method.lower(), route.path)
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(m, p) for p, item in served["paths"].items() for m in item}
    assert routes == documented
    assert {(op.method, op.path) for op in OPERATIONS} == documented


def test_sample_events_validate_and_bad_ones_do_not() -> None:
    event = schema_validator(request_schema("post", "/v1/events"))
    batch = schema_validator(request_schema("post", "/v1/events/batch"))
    good = [samples.llm_call(), samples.decision(), samples.custom(), samples.http_request()]
    for sample in good:
        event.validate(sample)
    batch.validate(good)
    batch.validate({"events": good})
    bad_confidence = samples.llm_call()
    bad_confidence["reasoning"]["confidence"] = 2
    bad_count = samples.decision()
    bad_count["decision"]["input_count"] = -1
    no_trace = samples.custom()
    del no_trace["trace_id"]
    bad_ones: list[Any] = [bad_confidence, bad_count, no_trace, {"event_type": "x"}, [], "text"]
    for bad in bad_ones:
        assert not event.is_valid(bad), bad
    assert not batch.is_valid({"events": [bad_confidence]})


def test_real_answers_validate_against_their_documented_schemas(client: TestClient) -> None:
    events = [samples.decision(), samples.llm_call()]
    trace_id = events[0]["trace_id"]
    cases: list[tuple[str, str, int, Any]] = [
        ("post", "/v1/events/batch", 202, client.post("/v1/events/batch", json=events)),
        ("post", "/v1/events", 400, client.post("/v1/events", content=b"{}")),
    ]
    wait_until_stored(client, trace_id, len(events))
    gets = {
        "/health": "/health",
        "/ready": "/ready",
        "/v1/events": f"/v1/events?trace_id={trace_id}",
        "/v1/events/{span_id}": f"/v1/events/{events[0]['span_id']}",
        "/v1/traces": "/v1/traces",
        "/v1/traces/{trace_id}": f"/v1/traces/{trace_id}",
        "/v1/analytics/high-drop-traces": "/v1/analytics/high-drop-traces?threshold=0",
        "/v1/analytics/drop-reasons": "/v1/analytics/drop-reasons",
        "/v1/analytics/funnel-stats": f"/v1/analytics/funnel-stats?trace_id={trace_id}",
        "/v1/analytics/metadata-values": "/v1/analytics/metadata-values?field=domain",
    }
    cases += [("get", path, 200, client.get(url)) for path, url in gets.items()]
    for method, path, status, response in cases:
        assert response.status_code == status, (path, response.text)
        body = response.json()
        schema_validator(response_schema(method, path, status)).validate(body)
        if path.startswith("/v1/analytics") and path != "/v1/analytics/metadata-values":
            assert body != {} and any(body.values())  # not an empty answer that fits anything


def test_a_dead_workers_gauges_are_forgotten(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    (tmp_path / f"counter_{gone.pid}.db").write_bytes(b"")  # counters keep counting
    assert forget_dead_workers(tmp_path) == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db"]
    )
