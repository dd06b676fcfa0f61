"""Builds the tree of a trace's events from parent_span_id: a forest in time order."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

Node = dict[str, Any]


def build_forest(
    events: list[tuple[uuid.UUID, uuid.UUID | None, bytes | msgspec.Raw]],
) -> list[Node]:
    """Returns the roots; each node is the stored event with a "children" list.

    `events` come in time order, so siblings stay in time order. An event whose parent is not
    in the trace (or is itself) is a root; a parent link that would close a cycle is dropped,
    so the later event of the cycle becomes a root. Repeated span_ids: links go to the first.
    """
    nodes: list[Node] = []
    first_by_span: dict[uuid.UUID, Node] = {}
    parent_of: dict[int, Node] = {}
    roots: list[Node] = []
    for span_id, _parent, data in events:
        node: Node = msgspec.json.decode(data)
        node["children"] = []
        nodes.append(node)
        first_by_span.setdefault(span_id, node)
    for node, (_span_id, parent_span_id, _data) in zip(nodes, events, strict=True):
        parent = first_by_span.get(parent_span_id) if parent_span_id is not None else None
        if parent is None or parent is node or _is_ancestor(node, parent, parent_of):
            roots.append(node)
            continue
        parent_of[id(node)] = parent
        parent["children"].append(node)
    return roots


def _is_ancestor(candidate: Node, node: Node, parent_of: dict[int, Node]) -> bool:
    """Whether candidate is node or one of its ancestors along the links kept so far."""
    current: Node | None = node
    while current is not None:
        if current is candidate:
            return True
        current = parent_of.get(id(current))
    return False
