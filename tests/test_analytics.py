"""Trace filters, the trace tree and the analytics endpoints, on a small hand-built dataset whose
expected answers are computed here, independently of the SQL."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.samples import dumps
from tests.test_routes import fetch, settings_for
from xray_ingest import db
from xray_ingest.app import create_app
from xray_ingest.models import decode_row

T1, T2, T3, T4 = (str(uuid.UUID(int=n << 64)) for n in (1, 2, 3, 4))
RETAIL_EU = {"domain": "retail", "region": "eu"}


def decision(trace: str, at: str, counts: tuple[int, int], dropped: list[Any], **extra: Any) -> Any:
    return {
        "event_type": "decision",
        "trace_id": trace,
        "span_id": str(uuid.uuid4()),
        "timestamp": at,
        "decision": {
            "input_count": counts[0],
            "output_count": counts[1],
            "kept": [{"count": counts[1], "reason": "good"}],
            "dropped": [{"count": n, "reason": reason} for n, reason in dropped],
        },
        **extra,
    }


ROOT = str(uuid.uuid4())
DATASET: list[dict[str, Any]] = [
    # T1: search, retail/eu, an llm_call root, two decisions under it, an http error.
    {
        "event_type": "llm_call",
        "trace_id": T1,
        "span_id": ROOT,
        "timestamp": "2024-01-03T10:00:00Z",
        "service": "search",
        "duration_ms": 500,
        "metadata": RETAIL_EU,
    },
    decision(
        T1,
        "2024-01-03T10:00:01Z",
        (100, 5),
        [(60, "price"), (35, "rating")],
        service="search",
        metadata=RETAIL_EU,
        parent_span_id=ROOT,
    ),
    decision(
        T1,
        "2024-01-03T10:00:02Z",
        (5, 2),
        [(3, "stock")],
        service="search",
        metadata=RETAIL_EU,
        parent_span_id=ROOT,
    ),
    {
        "event_type": "http_request",
        "trace_id": T1,
        "span_id": str(uuid.uuid4()),
        "timestamp": "2024-01-03T10:00:03Z",
        "service": "search",
        "duration_ms": 1500,
        "metadata": RETAIL_EU,
        "request": {"method": "GET", "url": "https://shop.example/api"},
        "error": {"message": "timeout", "code": "ETIMEDOUT"},
    },
    # T2: ads, travel, a total drop and a decision with no input (no drop rate).
    decision(
        T2,
        "2024-01-02T10:00:00Z",
        (10, 0),
        [(10, "price")],
        service="ads",
        metadata={"domain": "travel"},
    ),
    decision(T2, "2024-01-02T10:00:05Z", (0, 0), [], service="ads", metadata={"domain": "travel"}),
    # T3: search, retail/us, one decision.
    decision(
        T3,
        "2024-01-03T09:00:00Z",
        (50, 10),
        [(40, "price")],
        service="search",
        metadata={"domain": "retail", "region": "us"},
    ),
    # T4: no decisions at all.
    {
        "event_type": "llm_call",
        "trace_id": T4,
        "span_id": str(uuid.uuid4()),
        "timestamp": "2024-01-01T00:00:00Z",
    },
]
DECISIONS = [e for e in DATASET if e["event_type"] == "decision"]


def at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"]).astimezone(UTC)


def percent(rate: float | None) -> float:
    assert rate is not None
    return round(rate * 100, 2)


def drop_rate(event: dict[str, Any]) -> float | None:
    counts = event["decision"]
    if not counts["input_count"]:
        return None
    rate: float = 1 - counts["output_count"] / counts["input_count"]
    return rate


@pytest.fixture
def client(database_dsn: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(database_dsn))) as test_client:
        yield test_client


@pytest.fixture
async def seeded(database_dsn: str, client: TestClient) -> TestClient:
    pool = await db.create_pool(database_dsn, max_size=1)
    try:
        await db.copy_events(pool, [decode_row(dumps(event)) for event in DATASET])
    finally:
        await pool.close()
    return client


# ---- high-drop-traces ------------------------------------------------------------------------


def expected_high_drops(threshold: float, keep: Any = lambda e: True) -> list[tuple[str, float]]:
    hits = [
        (e, rate)
        for e in DECISIONS
        if (rate := drop_rate(e)) is not None and rate >= threshold and keep(e)
    ]
    hits.sort(key=lambda hit: (-hit[1], -at(hit[0]).timestamp()))
    return [(e["span_id"], round(rate * 100, 2)) for e, rate in hits]


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({}, lambda e: True),
        ({"service": "search"}, lambda e: e["service"] == "search"),
        ({"metadata.region": "eu"}, lambda e: e["metadata"].get("region") == "eu"),
        (
            {"metadata.domain": "retail", "metadata.region": "us"},
            lambda e: e["metadata"] == {"domain": "retail", "region": "us"},
        ),
        ({"since": "2024-01-03T00:00:00Z"}, lambda e: at(e) >= datetime(2024, 1, 3, tzinfo=UTC)),
        (
            {"until": "2024-01-03T09:30:00"},
            lambda e: at(e) <= datetime(2024, 1, 3, 9, 30, tzinfo=UTC),
        ),
    ],
)
@pytest.mark.parametrize("threshold", [0.9, 0.5, 0.0])
def test_high_drop_decisions_match_an_independent_computation(
    seeded: TestClient, params: dict[str, str], keep: Any, threshold: float
) -> None:
    response = seeded.get(
        "/v1/analytics/high-drop-traces", params={"threshold": str(threshold), **params}
    )
    assert response.status_code == 200
    body = response.json()
    expected = expected_high_drops(threshold, keep)
    assert body["threshold"] == threshold
    assert body["count"] == len(expected)
    assert [(t["span_id"], t["drop_rate_percent"]) for t in body["traces"]] == expected


def test_high_drop_entries_carry_the_event_fields(seeded: TestClient) -> None:
    body = seeded.get("/v1/analytics/high-drop-traces", params={"limit": "1"}).json()
    event = DECISIONS[2]  # T2's 10 -> 0
    assert body["traces"] == [
        {
            "trace_id": T2,
            "span_id": event["span_id"],
            "service": "ads",
            "timestamp": "2024-01-02T10:00:00+00:00",
            "input_count": 10,
            "output_count": 0,
            "drop_rate_percent": 100.0,
            "metadata": {"domain": "travel"},
        }
    ]


# ---- drop-reasons ----------------------------------------------------------------------------


def expected_reasons(keep: Any = lambda e: True) -> list[dict[str, Any]]:
    sums: dict[str, int] = defaultdict(int)
    traces: dict[str, set[str]] = defaultdict(set)
    shares: dict[str, list[float]] = defaultdict(list)
    for event in filter(keep, DECISIONS):
        for drop in event["decision"]["dropped"]:
            sums[drop["reason"]] += drop["count"]
            traces[drop["reason"]].add(event["trace_id"])
            shares[drop["reason"]].append(drop["count"] / event["decision"]["input_count"] * 100)
    ordered = sorted(sums, key=lambda reason: (-sums[reason], reason))
    return [
        {
            "reason": reason,
            "total_count": sums[reason],
            "affected_traces": len(traces[reason]),
            "occurrences": len(shares[reason]),
            "avg_percentage": round(sum(shares[reason]) / len(shares[reason]), 2),
        }
        for reason in ordered
    ]


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({}, lambda e: True),
        ({"trace_id": T1}, lambda e: e["trace_id"] == T1),
        ({"service": "search"}, lambda e: e["service"] == "search"),
        ({"metadata.domain": "retail"}, lambda e: e["metadata"]["domain"] == "retail"),
        (
            {"since": "2024-01-03T09:30:00Z"},
            lambda e: at(e) >= datetime(2024, 1, 3, 9, 30, tzinfo=UTC),
        ),
    ],
)
def test_drop_reasons_match_an_independent_computation(
    seeded: TestClient, params: dict[str, str], keep: Any
) -> None:
    body = seeded.get("/v1/analytics/drop-reasons", params=params).json()
    expected = expected_reasons(keep)
    assert body == {"count": len(expected), "reasons": expected}


def test_drop_reasons_limit_keeps_the_largest(seeded: TestClient) -> None:
    body = seeded.get("/v1/analytics/drop-reasons", params={"limit": "1"}).json()
    assert [r["reason"] for r in body["reasons"]] == ["price"]


# ---- funnel-stats ----------------------------------------------------------------------------


def test_funnel_lists_the_decision_steps_with_cumulative_drop(seeded: TestClient) -> None:
    body = seeded.get("/v1/analytics/funnel-stats", params={"trace_id": T1}).json()
    steps = [e for e in DECISIONS if e["trace_id"] == T1]
    initial = steps[0]["decision"]["input_count"]
    final = steps[-1]["decision"]["output_count"]
    assert (body["trace_id"], body["decision_count"]) == (T1, 2)
    assert (body["initial_input"], body["final_output"]) == (initial, final)
    assert body["cumulative_drop_rate"] == round((1 - final / initial) * 100, 2)
    assert [
        (s["step"], s["span_id"], s["drop_rate_percent"], s["cumulative_drop_rate_percent"])
        for s in body["funnel"]
    ] == [
        (
            n,
            e["span_id"],
            percent(drop_rate(e)),
            percent(1 - e["decision"]["output_count"] / initial),
        )
        for n, e in enumerate(steps, start=1)
    ]
    assert body["funnel"][0]["dropped"] == steps[0]["decision"]["dropped"]
    assert body["funnel"][0]["kept"] == steps[0]["decision"]["kept"]


@pytest.mark.parametrize("trace_id", [T4, str(uuid.uuid4())])
def test_funnel_of_a_trace_without_decisions_is_a_404(seeded: TestClient, trace_id: str) -> None:
    response = seeded.get("/v1/analytics/funnel-stats", params={"trace_id": trace_id})
    assert response.status_code == 404


# ---- metadata-values -------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", [None, "decision", "llm_call"])
def test_metadata_values_are_counted(seeded: TestClient, event_type: str | None) -> None:
    params = {"field": "domain", **({"event_type": event_type} if event_type else {})}
    body = seeded.get("/v1/analytics/metadata-values", params=params).json()
    counts: dict[str, int] = defaultdict(int)
    for event in DATASET:
        if "domain" in event.get("metadata", {}) and event_type in (None, event["event_type"]):
            counts[event["metadata"]["domain"]] += 1
    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    assert body == {"field": "domain", "values": [{"value": v, "count": n} for v, n in expected]}


# ---- trace list filters and the trace tree ---------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [T1, T3, T2, T4]),
        ({"service": "ads"}, [T2]),
        ({"event_type": "http_request"}, [T1]),
        ({"has_error": "true"}, [T1]),
        ({"has_error": "false"}, [T3, T2, T4]),
        ({"metadata.region": "us"}, [T3]),
        ({"metadata.domain": "retail", "service": "search"}, [T1, T3]),
        ({"min_duration_ms": "4500"}, [T1, T2]),
        ({"min_duration_ms": "4501"}, [T2]),
        ({"min_duration_ms": "5001"}, []),
        ({"since": "2024-01-03T09:30:00Z"}, [T1]),
        ({"since": "2024-01-02T00:00:00Z", "until": "2024-01-02T23:59:59Z"}, [T2]),
        ({"until": "2024-01-02T10:00:00Z"}, [T2, T4]),
        ({"metadata.a'); DROP TABLE events;--": "x"}, []),
    ],
)
def test_trace_list_filters(
    seeded: TestClient, params: dict[str, str], expected: list[str]
) -> None:
    response = seeded.get("/v1/traces", params=params)
    assert response.status_code == 200
    assert [t["trace_id"] for t in response.json()["traces"]] == expected


async def test_a_hostile_metadata_key_is_only_a_key(seeded: TestClient, database_dsn: str) -> None:
    hostile = {"metadata.a'); DROP TABLE events;--": "x", "service": "'; DELETE FROM traces;--"}
    for path in ("/v1/traces", "/v1/analytics/high-drop-traces", "/v1/analytics/drop-reasons"):
        assert seeded.get(path, params=hostile).status_code == 200
    field = {"field": "x'); DROP TABLE events;--"}
    assert seeded.get("/v1/analytics/metadata-values", params=field).json()["values"] == []
    assert len(await fetch(database_dsn, "SELECT 1 FROM events")) == len(DATASET)


def test_trace_detail_has_the_summary_and_the_tree(seeded: TestClient) -> None:
    body = seeded.get(f"/v1/traces/{T1}").json()
    assert (body["trace_id"], body["event_count"], body["services"]) == (T1, 4, ["search"])
    assert body["start_time"] == "2024-01-03T10:00:00Z"
    assert body["end_time"] == "2024-01-03T10:00:04.500000Z"
    assert body["duration_ms"] == 4500
    assert body["event_types"] == {"llm_call": 1, "decision": 2, "http_request": 1}
    roots = body["tree"]
    assert [r["span_id"] for r in roots] == [ROOT, DATASET[3]["span_id"]]
    assert [c["span_id"] for c in roots[0]["children"]] == [
        DATASET[1]["span_id"],
        DATASET[2]["span_id"],
    ]
    assert roots[0]["children"][0]["decision"] == DATASET[1]["decision"]


@pytest.mark.parametrize(("trace_id", "status"), [(str(uuid.uuid4()), 404), ("nope", 400)])
def test_unknown_or_malformed_trace_id(seeded: TestClient, trace_id: str, status: int) -> None:
    assert seeded.get(f"/v1/traces/{trace_id}").status_code == status


BAD = [
    ("/v1/analytics/high-drop-traces?threshold=2", "threshold"),
    ("/v1/analytics/high-drop-traces?threshold=lots", "threshold"),
    ("/v1/analytics/high-drop-traces?since=yesterday", "since"),
    ("/v1/analytics/high-drop-traces?limit=0", "limit"),
    ("/v1/analytics/drop-reasons?trace_id=42", "trace_id"),
    ("/v1/analytics/drop-reasons?until=soon", "until"),
    ("/v1/analytics/funnel-stats", "trace_id"),
    ("/v1/analytics/metadata-values", "field"),
    ("/v1/analytics/metadata-values?field=", "field"),
    ("/v1/traces?has_error=maybe", "has_error"),
    ("/v1/traces?min_duration_ms=-1", "min_duration_ms"),
    ("/v1/traces?service=", "service"),
    ("/v1/traces?metadata.=x", "metadata."),
]


@pytest.mark.parametrize(("url", "name"), BAD)
def test_bad_analytics_parameter_is_a_400_naming_it(
    client: TestClient, url: str, name: str
) -> None:
    response = client.get(url)
    assert response.status_code == 400
    assert response.json()["errors"][0]["path"] == name


async def test_pages_neither_skip_nor_repeat_while_events_keep_arriving(
    database_dsn: str, client: TestClient
) -> None:
    pool = await db.create_pool(database_dsn, max_size=1)

    async def add(trace_id: str, stamp: str) -> None:
        event = {"event_type": "x", "trace_id": trace_id, "timestamp": stamp}
        await db.copy_events(pool, [decode_row(dumps(event))])

    try:
        originals = [str(uuid.uuid4()) for _ in range(7)]
        for n, trace_id in enumerate(originals):
            await add(trace_id, f"2024-01-01T00:00:0{n}Z")
        seen: list[str] = []
        cursor = None
        for page_number in range(10):
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/traces", params=params).json()
            seen += [t["trace_id"] for t in page["traces"]]
            # Meanwhile: a newer trace arrives, and a later event for every original one.
            await add(str(uuid.uuid4()), f"2025-01-01T00:00:0{page_number}Z")
            for trace_id in originals:
                await add(trace_id, "2024-06-01T00:00:00Z")
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        await pool.close()
    assert seen == list(reversed(originals))


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"tier": 3, "vip": True}, {"metadata.tier": "3"}),
        ({"tier": "3", "vip": True}, {"metadata.tier": "3"}),
        ({"tier": 3, "vip": True}, {"metadata.vip": "true"}),
        ({"tier": 3, "vip": True}, {"metadata.tier": "3", "metadata.vip": "true"}),
    ],
)
async def test_metadata_filter_matches_numbers_and_booleans_by_their_text(
    database_dsn: str, client: TestClient, tags: dict[str, Any], expected: dict[str, str]
) -> None:
    trace_id = str(uuid.uuid4())
    event = {"event_type": "x", "trace_id": trace_id, "timestamp": "2024-01-01T00:00:00Z"}
    pool = await db.create_pool(database_dsn, max_size=1)
    try:
        await db.copy_events(pool, [decode_row(dumps({**event, "metadata": tags}))])
    finally:
        await pool.close()
    found = client.get("/v1/traces", params=expected).json()["traces"]
    assert [t["trace_id"] for t in found] == [trace_id]
    assert client.get("/v1/traces", params={"metadata.tier": "4"}).json()["traces"] == []


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"metadata.region": "us"}, [T3]),
        ({"metadata.domain": "retail", "service": "search"}, [T1, T3]),
        ({"metadata.domain": "retail", "metadata.region": "eu"}, [T1]),
    ],
)
def test_common_tags_walk_the_traces_and_give_the_same_answers(
    seeded: TestClient, monkeypatch: pytest.MonkeyPatch, params: dict[str, str], expected: list[str]
) -> None:
    monkeypatch.setattr(db, "RARE_TAG_EVENTS", 0)  # every tag counts as common
    assert [t["trace_id"] for t in seeded.get("/v1/traces", params=params).json()["traces"]] == (
        expected
    )
