"""The trace tree: parents, orphans, cycles, sibling order."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from xray_ingest.tree import build_forest

A, B, C, D, MISSING = (uuid.UUID(int=n) for n in range(1, 6))


def event(span: uuid.UUID, parent: uuid.UUID | None) -> tuple[uuid.UUID, uuid.UUID | None, bytes]:
    return span, parent, orjson.dumps({"span_id": str(span), "n": span.int})


def shape(nodes: list[dict[str, Any]]) -> list[Any]:
    return [(node["n"], shape(node["children"])) for node in nodes]


def test_children_hang_under_their_parent_in_time_order() -> None:
    forest = build_forest([event(A, None), event(C, A), event(B, A), event(D, C)])
    assert shape(forest) == [(1, [(3, [(4, [])]), (2, [])])]
    assert forest[0]["span_id"] == str(A)


def test_child_seen_before_its_parent_still_hangs_under_it() -> None:
    assert shape(build_forest([event(B, A), event(A, None)])) == [(1, [(2, [])])]


def test_orphans_and_self_parents_become_roots() -> None:
    forest = build_forest([event(A, None), event(B, MISSING), event(C, C)])
    assert shape(forest) == [(1, []), (2, []), (3, [])]


def test_a_cycle_is_broken_at_its_later_event() -> None:
    forest = build_forest([event(A, C), event(B, A), event(C, B), event(D, None)])
    assert shape(forest) == [(3, [(1, [(2, [])])]), (4, [])]


def test_an_empty_trace_has_no_roots() -> None:
    assert build_forest([]) == []
