"""Sample events as the X-Ray clients send them (shared/spec/events.md)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

TRACE_ID = "550e8400-e29b-41d4-a716-446655440000"


def llm_call(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_type": "llm_call",
        "trace_id": TRACE_ID,
        "span_id": str(uuid.uuid4()),
        "timestamp": "2024-01-03T10:30:00Z",
        "duration_ms": 567,
        "service": "competitor-search-ui",
        "reasoning": {
            "summary": "Selected top 3 products based on relevance",
            "confidence": 0.85,
            "decision_factors": ["price", "rating"],
            "alternatives_considered": ["cheapest"],
            "effort": "medium",
        },
        "model": {"provider": "openai", "name": "gpt-4", "params": {"temperature": 0.7}},
        "input": {"raw_prompt": "Find competitors", "input_tokens": 150},
        "output": {"response_text": "A, B, C", "output_tokens": 200, "finish_reason": "stop"},
        "variability": {"nondeterministic": True, "reason": "temperature > 0"},
        "metrics": {"latency_ms": 567, "cost_usd": 0.0123},
        "metadata": {"domain": "retail", "user_id": "u-1"},
    }
    event.update(fields)
    return event


def decision(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_type": "decision",
        "trace_id": TRACE_ID,
        "span_id": str(uuid.uuid4()),
        "timestamp": "2024-01-03T10:30:01Z",
        "service": "competitor-search-ui",
        "decision": {
            "input_count": 100,
            "output_count": 5,
            "kept": [{"count": 5, "reason": "in stock"}],
            "dropped": [{"count": 60, "reason": "price"}, {"count": 35, "reason": "rating"}],
        },
        "criteria": {"max_price": 50},
        "metadata": {"domain": "retail"},
    }
    event.update(fields)
    return event


def http_request(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_type": "http_request",
        "trace_id": TRACE_ID,
        "span_id": str(uuid.uuid4()),
        "timestamp": "2024-01-03T10:30:02Z",
        "request": {"method": "GET", "url": "https://example.com/search"},
        "response": {"status": 503},
        "error": {"message": "upstream unavailable", "code": "E_UPSTREAM"},
    }
    event.update(fields)
    return event


def custom(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_type": "cache_lookup",
        "trace_id": TRACE_ID,
        "span_id": str(uuid.uuid4()),
        "timestamp": "2024-01-03T10:30:03Z",
        "data": {"hit": False, "key": "k1"},
    }
    event.update(fields)
    return event


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)
