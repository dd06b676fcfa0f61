"""Decoding bodies into rows: envelope and typed-part validation, payloads kept as sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from tests import samples
from tests.samples import dumps
from xray_ingest.errors import BatchTooLargeError
from xray_ingest.models import KNOWN_EVENTS, InvalidEvent, decode_batch, decode_row


def invalid(event: object) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode_row(event if isinstance(event, bytes) else dumps(event))
    return caught.value


@pytest.mark.parametrize(
    ("sample", "event_type"),
    [
        (samples.llm_call, "llm_call"),
        (samples.decision, "decision"),
        (samples.http_request, "http_request"),
        (samples.custom, "cache_lookup"),
    ],
)
def test_each_known_event_type_decodes_to_a_row_with_its_payload_verbatim(
    sample: object, event_type: str
) -> None:
    assert callable(sample)
    event = sample(extra_client_field={"nested": [1, 2, 3]})
    body = dumps(event)
    row = decode_row(body)
    event_id, kind, trace_id, span_id, parent, service, timestamp, duration, data = row
    assert kind == event_type
    assert event_id == span_id == uuid.UUID(event["span_id"])
    assert trace_id == uuid.UUID(samples.TRACE_ID)
    assert parent is None
    assert service == event.get("service")
    assert timestamp.tzinfo is not None
    assert duration == event.get("duration_ms")
    assert bytes(data) == body


def test_missing_span_id_is_generated_and_added_to_the_payload() -> None:
    event = samples.decision()
    del event["span_id"]
    row = decode_row(dumps(event) + b"\n  ")
    stored = orjson.loads(bytes(row[8]))
    assert stored["span_id"] == str(row[3])
    assert uuid.UUID(stored["span_id"]).version == 4
    assert {k: v for k, v in stored.items() if k != "span_id"} == event


def test_null_span_id_is_replaced_and_the_generated_one_wins_in_the_payload() -> None:
    row = decode_row(dumps(samples.custom(span_id=None)))
    # jsonb keeps the last of duplicate keys; ours is appended last.
    assert bytes(row[8]).endswith(f'"span_id":"{row[3]}"}}'.encode())


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2024-01-03T10:30:00Z", datetime(2024, 1, 3, 10, 30, tzinfo=UTC)),
        ("2024-01-03T10:30:00+02:00", datetime(2024, 1, 3, 8, 30, tzinfo=UTC)),
        ("2024-01-03T10:30:00", datetime(2024, 1, 3, 10, 30, tzinfo=UTC)),
        ("2024-01-03T10:30:00.123Z", datetime(2024, 1, 3, 10, 30, 0, 123000, tzinfo=UTC)),
    ],
)
def test_timestamps_with_or_without_offset_become_utc(stamp: str, expected: datetime) -> None:
    timestamp = decode_row(dumps(samples.custom(timestamp=stamp)))[6]
    assert timestamp == expected
    assert timestamp.utcoffset() is not None


def test_float_duration_is_rounded() -> None:
    assert decode_row(dumps(samples.custom(duration_ms=12.6)))[7] == 13


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"trace_id": "not-a-uuid"}, "$.trace_id"),
        ({"trace_id": None}, "$.trace_id"),
        ({"timestamp": "yesterday"}, "$.timestamp"),
        ({"timestamp": 1704277800}, "$.timestamp"),
        ({"timestamp": "0001-01-01T00:00:00+05:00"}, "$.timestamp"),
        ({"timestamp": "0001-12-31T23:59:59Z"}, "$.timestamp"),
        ({"timestamp": "9999-01-01T00:00:00-05:00"}, "$.timestamp"),
        ({"span_id": "x"}, "$.span_id"),
        ({"parent_span_id": "x"}, "$.parent_span_id"),
        ({"service": "s" * 256}, "$.service"),
        ({"duration_ms": "5"}, "$.duration_ms"),
        ({"duration_ms": -1}, "$.duration_ms"),
        ({"duration_ms": 2**31}, "$.duration_ms"),
        ({"metadata": ["a"]}, "$.metadata"),
        ({"event_type": ""}, "$.event_type"),
        ({"event_type": "e" * 51}, "$.event_type"),
        ({"event_type": 7}, "$.event_type"),
    ],
)
def test_bad_envelope_field_is_named_by_its_path(change: dict[str, object], path: str) -> None:
    assert invalid(samples.custom(**change)).path == path


@pytest.mark.parametrize("field", ["trace_id", "timestamp", "event_type"])
def test_missing_required_field_is_named(field: str) -> None:
    event = samples.llm_call()
    del event[field]
    error = invalid(event)
    assert error.path == f"$.{field}"
    assert field in error.message


@pytest.mark.parametrize(
    ("event", "path"),
    [
        (samples.decision(decision={"input_count": "100"}), "$.decision.input_count"),
        (samples.decision(decision={"output_count": -1}), "$.decision.output_count"),
        (samples.decision(decision={"dropped": [{"count": "x"}]}), "$.decision.dropped[0].count"),
        (samples.decision(decision=[1]), "$.decision"),
        (samples.decision(criteria="cheap"), "$.criteria"),
        (samples.llm_call(reasoning={"confidence": 1.5}), "$.reasoning.confidence"),
        (samples.llm_call(reasoning={"decision_factors": "price"}), "$.reasoning.decision_factors"),
        (samples.llm_call(input={"input_tokens": "150"}), "$.input.input_tokens"),
        (samples.llm_call(output={"output_tokens": 1.5}), "$.output.output_tokens"),
        (samples.llm_call(model={"params": {"max_tokens": "x"}}), "$.model.params.max_tokens"),
        (samples.http_request(response={"status": "ok"}), "$.response.status"),
        (samples.custom(data="not an object"), "$.data"),
    ],
)
def test_typed_part_of_a_known_event_type_is_checked(event: object, path: str) -> None:
    assert invalid(event).path == path


def test_llm_call_without_reasoning_is_accepted_as_older_clients_send_it() -> None:
    event = samples.llm_call()
    for part in ("reasoning", "model", "input", "output", "variability", "metrics"):
        del event[part]
    assert decode_row(dumps(event))[1] == "llm_call"


def test_typed_parts_are_not_applied_to_custom_event_types() -> None:
    row = decode_row(dumps(samples.custom(decision="a custom field that is a string")))
    assert row[1] == "cache_lookup"


def test_escaped_nul_is_rejected_because_postgres_cannot_store_it() -> None:
    assert "\\u0000" in invalid(rb'{"a":"x\u0000"}').message


def test_escaped_backslash_before_u0000_text_is_not_a_nul() -> None:
    event = samples.custom(data={"path": "C:\\u0000dir"})
    body = dumps(event)
    assert b"\\\\u0000" in body
    assert bytes(decode_row(body)[8]) == body


def test_lone_surrogate_is_rejected() -> None:
    body = dumps(samples.custom())[:-1] + rb',"x":"\ud800 alone"}'
    assert invalid(body).path == "$"


def test_deep_nesting_is_a_validation_error_not_a_crash() -> None:
    body = dumps(samples.custom())[:-1] + b',"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested" in invalid(body).message


def test_malformed_json_is_invalid_at_the_root() -> None:
    assert invalid(b'{"event_type": ').path == "$"


def test_batch_object_array_and_ndjson_forms_decode_alike() -> None:
    events = [samples.llm_call(), samples.decision(), samples.custom()]
    wrapped = decode_batch(dumps({"events": events}), ndjson=False, max_items=10)
    bare = decode_batch(dumps(events), ndjson=False, max_items=10)
    ndjson = b"\n".join(dumps(e) for e in events) + b"\n\n"
    lines = decode_batch(ndjson, ndjson=True, max_items=10)
    expected = [uuid.UUID(e["span_id"]) for e in events]
    for batch in (wrapped, bare, lines):
        assert batch.ids == expected
        assert batch.errors == []
        assert [bytes(row[8]) for row in batch.rows] == [dumps(e) for e in events]
        assert batch.size == sum(len(dumps(e)) for e in events)


def test_batch_with_one_bad_event_keeps_the_others_and_reports_index_and_path() -> None:
    events = [samples.llm_call(), samples.decision(trace_id="nope"), samples.custom()]
    batch = decode_batch(dumps({"events": events}), ndjson=False, max_items=10)
    assert len(batch.rows) == 2
    assert batch.ids[1] is None
    assert batch.ids[0] == uuid.UUID(events[0]["span_id"])
    assert [(e.index, e.path) for e in batch.errors] == [(1, "$.trace_id")]
    assert batch.size == len(dumps(events[0])) + len(dumps(events[2]))


def test_batch_outcomes_stay_per_item_around_several_bad_events() -> None:
    events = [
        samples.decision(trace_id="nope"),
        samples.llm_call(),
        samples.custom(timestamp="yesterday"),
        samples.decision(),
    ]
    batch = decode_batch(dumps(events), ndjson=False, max_items=10)
    assert batch.ids == [
        None,
        uuid.UUID(events[1]["span_id"]),
        None,
        uuid.UUID(events[3]["span_id"]),
    ]
    assert [(e.index, e.path) for e in batch.errors] == [(0, "$.trace_id"), (2, "$.timestamp")]
    assert [bytes(row[8]) for row in batch.rows] == [dumps(events[1]), dumps(events[3])]
    assert batch.size == len(dumps(events[1])) + len(dumps(events[3]))


def test_batch_item_that_is_not_an_object_is_a_per_item_error() -> None:
    batch = decode_batch(b'[1, "x", null]', ndjson=False, max_items=10)
    assert [e.index for e in batch.errors] == [0, 1, 2]
    assert batch.rows == []


@pytest.mark.parametrize("body", [b'{"evnts": []}', b'"events"', b"{", b'{"events": {}}'])
def test_body_that_is_not_a_batch_is_invalid(body: bytes) -> None:
    with pytest.raises(InvalidEvent):
        decode_batch(body, ndjson=False, max_items=10)


def test_batch_over_the_item_limit_is_refused() -> None:
    with pytest.raises(BatchTooLargeError):
        decode_batch(dumps([samples.custom()] * 3), ndjson=False, max_items=2)


def nested(levels: int) -> object:
    value: object = "leaf [{ brackets in a string do not count"
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


def test_nesting_up_to_the_limit_is_accepted_and_beyond_it_refused() -> None:
    # The event object itself is one level.
    assert decode_row(dumps(samples.custom(data={"deep": nested(8)})), max_depth=10)
    error = invalid_with_depth(samples.custom(data={"deep": nested(9)}), max_depth=10)
    assert (error.path, error.message) == ("$", "JSON is nested deeper than 10 levels")


def invalid_with_depth(event: object, max_depth: int) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode_row(dumps(event), max_depth=max_depth)
    return caught.value


def test_depth_of_arrays_alone_or_objects_alone_is_refused() -> None:
    only_arrays: object = [1]
    only_objects: object = {"k": 1}
    for _ in range(9):
        only_arrays = [only_arrays]
        only_objects = {"k": only_objects}
    # With data's and the event's own objects: 12 levels.
    for deep in (only_arrays, only_objects):
        error = invalid_with_depth(samples.custom(data={"deep": deep}), max_depth=11)
        assert error.message == "JSON is nested deeper than 11 levels"
        assert decode_row(dumps(samples.custom(data={"deep": deep})), max_depth=12)


def test_many_flat_brackets_are_not_mistaken_for_depth() -> None:
    event = samples.custom(data={"items": [[1], [2], [3]] * 20})
    assert decode_row(dumps(event), max_depth=4)
    # Past the count's cap (one more than the limit) in braces and in brackets alike: 5 levels.
    event = samples.custom(data={"items": [{"k": [1]}] * 20})
    assert decode_row(dumps(event), max_depth=5)


def test_text_that_looks_like_a_huge_number_is_just_text() -> None:
    body = dumps(samples.custom(data={"s": "1e1000000"}))
    assert bytes(decode_row(body)[8]) == body


def test_each_known_event_type_is_its_structs_tag() -> None:
    for kind in KNOWN_EVENTS:
        assert kind.event_type == kind.__struct_config__.tag
        event = samples.custom(event_type=kind.event_type)
        assert decode_row(dumps(event))[1] == kind.event_type
