"""Thousands of malformed bodies, events and parameters: never a 5xx, and the server lives on."""

from __future__ import annotations

import gzip
import json
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests import samples
from tests.test_routes import settings_for
from xray_ingest.app import create_app

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "\u0000", "550e8400-e29b-41d4-a716-446655440000", "2024-01-03"])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    # The standard library's encoder: it takes integers of any size and lone surrogates
    # (as \ud800 escapes), both worth throwing at the server.
    return json.dumps(value).encode()


SAMPLES = [samples.llm_call, samples.decision, samples.http_request, samples.custom]


@st.composite
def mutated_events(draw: st.DrawFn) -> Any:
    """A real event with some fields replaced, removed or added, at any depth of one level."""
    event: dict[str, Any] = draw(st.sampled_from(SAMPLES))()
    for key in draw(st.lists(st.sampled_from(sorted(event)), max_size=4, unique=True)):
        action = draw(st.sampled_from(["replace", "delete", "nest"]))
        if action == "delete":
            del event[key]
        elif action == "nest" and isinstance(event[key], dict) and event[key]:
            inner = draw(st.sampled_from(sorted(event[key])))
            event[key][inner] = draw(JSON_VALUES)
        else:
            event[key] = draw(JSON_VALUES)
    event.update(draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2)))
    return event


BODIES = (
    mutated_events().map(dumps)
    | JSON_VALUES.map(dumps)
    | st.binary(max_size=200)
    | st.lists(mutated_events(), max_size=5).map(lambda items: dumps({"events": items}))
    | st.lists(mutated_events(), max_size=5).map(lambda items: dumps(items))
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "application/x-ndjson", "text/plain", "nonsense/;;;"]
        ),
        "Content-Encoding": st.sampled_from(["gzip", "zstd", "identity", "br", "gzip, zstd"]),
        "Prefer": st.sampled_from(["wait", "wait=1", "wait=abc", "respond-async"]),
    },
)
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_random_posts_never_get_a_5xx(database_dsn: str) -> None:
    with TestClient(create_app(settings_for(database_dsn, durable_timeout_s=2))) as client:

        @FUZZ
        @given(
            path=st.sampled_from(["/v1/events", "/v1/events/batch"]),
            body=BODIES,
            headers=HEADERS,
            compress=st.booleans(),
        )
        def post(path: str, body: bytes, headers: dict[str, str], compress: bool) -> None:
            if compress and headers.get("Content-Encoding") == "gzip":
                body = gzip.compress(body)
            response = client.post(path, content=body, headers=headers)
            assert response.status_code < 500, (response.status_code, response.text)
            assert isinstance(response.json(), dict)

        post()
        assert client.get("/health").json()["status"] == "ok"


def test_random_query_parameters_never_get_a_5xx(database_dsn: str) -> None:
    with TestClient(create_app(settings_for(database_dsn))) as client:

        @FUZZ
        @given(
            path=st.sampled_from(["/v1/events", "/v1/traces", "/v1/events/{}", "/ready"]),
            segment=st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t),
            params=st.dictionaries(
                st.sampled_from(["trace_id", "limit", "cursor", "wait", "x"]),
                st.text(max_size=40),
                max_size=3,
            ),
        )
        def get(path: str, segment: str, params: dict[str, str]) -> None:
            response = client.get(path.format(quote(segment, safe="")), params=params)
            assert response.status_code < 500, response.text
            assert isinstance(response.json(), dict)

        get()
        assert client.get("/health").json()["status"] == "ok"
