"""The read queries over seeded rows: every one is planned on an index, never a scan of events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from xray_ingest import db
from xray_ingest.models import Row, TraceFilters
from xray_ingest.sql import QUERIES

TRACES = 2_000
EVENTS_PER_TRACE = 10
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)


def seeded_rows() -> Iterator[Row]:
    for trace_number in range(TRACES):
        trace_id = uuid.uuid4()
        for event_number in range(EVENTS_PER_TRACE):
            span_id = uuid.uuid4()
            timestamp = BASE_TIME + timedelta(minutes=trace_number, seconds=event_number)
            decision = {"input_count": 100, "output_count": event_number * 10}
            data = json.dumps({"span_id": str(span_id), "decision": decision}).encode()
            yield (span_id, "decision", trace_id, span_id, None, "svc", timestamp, 5, data)


@pytest.fixture
async def seeded_pool(pool: db.Pool) -> db.Pool:
    await db.copy_events(pool, list(seeded_rows()))
    async with pool.acquire() as connection:
        await connection.execute("ANALYZE")
    return pool


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def planned(pool: db.Pool, query: str, *args: object) -> list[tuple[str, str, str]]:
    async with pool.acquire() as connection:
        explained = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {QUERIES[query]}", *args)
    return [
        (node["Node Type"], node.get("Relation Name", ""), node.get("Index Name", ""))
        for node in plan_nodes(json.loads(bytes(explained))[0]["Plan"])
    ]


def assert_no_scan_of_events(nodes: list[tuple[str, str, str]]) -> None:
    assert ("Seq Scan", "events", "") not in nodes, nodes


async def test_trace_events_use_the_primary_key(seeded_pool: db.Pool) -> None:
    nodes = await planned(seeded_pool, "fetch_trace_events", uuid.uuid4())
    assert_no_scan_of_events(nodes)
    assert any(index == "events_pkey" for _, _, index in nodes), nodes


async def test_event_by_span_id_uses_its_index(seeded_pool: db.Pool) -> None:
    nodes = await planned(seeded_pool, "fetch_event", uuid.uuid4())
    assert_no_scan_of_events(nodes)
    assert any(index == "events_span_id_idx" for _, _, index in nodes), nodes


async def test_traces_page_walks_the_start_time_index(seeded_pool: db.Pool) -> None:
    first_page = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=2**128 - 1), 50)
    no_filters: tuple[object, ...] = (None, None, None, None, [], [], None, None)
    nodes = await planned(seeded_pool, "fetch_traces_page", *first_page, *no_filters)
    assert_no_scan_of_events(nodes)
    assert ("Seq Scan", "traces", "") not in nodes, nodes
    indexes = {index for _, _, index in nodes}
    assert {"traces_start_time_idx", "events_pkey"} <= indexes, nodes


async def test_traces_page_counts_match_the_seeded_rows(seeded_pool: db.Pool) -> None:
    after = BASE_TIME + timedelta(minutes=TRACES - 3)
    records = await db.fetch_traces_page(seeded_pool, after, uuid.UUID(int=0), 5, TraceFilters())
    assert [r["start_time"] for r in records] == [
        BASE_TIME + timedelta(minutes=m) for m in range(TRACES - 4, TRACES - 9, -1)
    ]
    assert {r["event_count"] for r in records} == {EVENTS_PER_TRACE}
    assert {r["end_time"] - r["start_time"] for r in records} == {timedelta(seconds=9.005)}


NO_TAGS: tuple[list[str], list[str]] = ([], [])
RECENT = BASE_TIME + timedelta(minutes=TRACES - 100)


async def test_trace_summary_reads_one_trace_by_its_keys(seeded_pool: db.Pool) -> None:
    nodes = await planned(seeded_pool, "fetch_trace_summary", uuid.uuid4())
    assert_no_scan_of_events(nodes)
    assert ("Seq Scan", "traces", "") not in nodes, nodes
    assert {"traces_pkey", "events_pkey"} <= {index for _, _, index in nodes}, nodes


async def test_funnel_uses_the_primary_key(seeded_pool: db.Pool) -> None:
    nodes = await planned(seeded_pool, "fetch_funnel", uuid.uuid4())
    assert_no_scan_of_events(nodes)
    assert any(index == "events_pkey" for _, _, index in nodes), nodes


async def test_high_drops_in_a_time_window_use_a_decision_index(seeded_pool: db.Pool) -> None:
    args = (Decimal("0.9"), None, RECENT, None, *NO_TAGS, 100)
    nodes = await planned(seeded_pool, "fetch_high_drop_decisions", *args)
    assert_no_scan_of_events(nodes)
    assert {index for _, _, index in nodes} & {
        "events_decision_time_idx",
        "events_decision_drop_rate_idx",
    }, nodes


async def test_high_drops_without_a_window_walk_the_drop_rate_index(seeded_pool: db.Pool) -> None:
    args = (Decimal("0.9"), None, None, None, *NO_TAGS, 100)
    nodes = await planned(seeded_pool, "fetch_high_drop_decisions", *args)
    assert_no_scan_of_events(nodes)
    assert any(index == "events_decision_drop_rate_idx" for _, _, index in nodes), nodes


async def test_drop_reasons_in_a_time_window_use_the_decision_time_index(
    seeded_pool: db.Pool,
) -> None:
    args = (None, RECENT, None, *NO_TAGS, None, 100)
    nodes = await planned(seeded_pool, "fetch_drop_reasons", *args)
    assert_no_scan_of_events(nodes)
    assert any(index == "events_decision_time_idx" for _, _, index in nodes), nodes
