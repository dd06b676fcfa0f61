"""msgspec Structs for the event envelope and the known event parts, and the decoding of bodies
into COPY rows. Structs describe only what we check; the stored payload stays the client's bytes."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, TypeAlias

import msgspec
from msgspec import Meta, Raw, Struct

from xray_ingest.errors import BatchTooLargeError

INT4_MAX: Final = 2**31 - 1

EventType = Annotated[str, Meta(min_length=1, max_length=50)]
Service = Annotated[str, Meta(max_length=255)]
DurationMs = Annotated[float, Meta(ge=0, le=INT4_MAX)]
Count = Annotated[int, Meta(ge=0, le=INT4_MAX)]
Fraction = Annotated[float, Meta(ge=0, le=1)]

# One events row, in db.COPY_COLUMNS order: id, event_type, trace_id, span_id, parent_span_id,
# service, timestamp, duration_ms, data (the event's JSON bytes as sent).
Row: TypeAlias = tuple[
    uuid.UUID,
    str,
    uuid.UUID,
    uuid.UUID,
    uuid.UUID | None,
    str | None,
    datetime,
    int | None,
    bytes | Raw,
]


# `metadata`, `criteria` and a custom event's `data` are checked to be objects and their members
# skipped, not decoded: the payload keeps them as sent. As dict[str, Raw] they built a dict, a key
# string and a Raw for each member, only to throw them away (batches of 1000 under callgrind:
# 67,847 -> 65,707 server instructions per event). The docstring is the OpenAPI description.
class AnyObject(Struct, gc=False):
    """Any JSON object."""


class Envelope(Struct, kw_only=True, gc=False):
    """The fields every event carries; unknown fields are ignored here and kept in the payload."""

    trace_id: uuid.UUID
    timestamp: datetime
    span_id: uuid.UUID | None = None
    parent_span_id: uuid.UUID | None = None
    service: Service | None = None
    duration_ms: DurationMs | None = None
    metadata: AnyObject | None = None


# ---- llm_call parts --------------------------------------------------------------------------
# Each decoded part is thrown away once validated and holds no cycle: gc=False keeps them out of
# the cyclic collector (decoding a ~1 KB llm_call or decision event: 27.5k -> 25.5k instructions).


class Reasoning(Struct, kw_only=True, gc=False):
    summary: str | None = None
    confidence: Fraction | None = None
    decision_factors: list[str] | None = None
    alternatives_considered: list[str] | None = None


class ModelParams(Struct, kw_only=True, gc=False):
    temperature: float | None = None
    max_tokens: Count | None = None
    seed: int | None = None


class Model(Struct, kw_only=True, gc=False):
    provider: str | None = None
    name: str | None = None
    temperature: float | None = None
    params: ModelParams | None = None


class LlmInput(Struct, kw_only=True, gc=False):
    input_tokens: Count | None = None
    raw_prompt: str | None = None
    system_prompt_hash: str | None = None
    user_prompt_hash: str | None = None


class LlmOutput(Struct, kw_only=True, gc=False):
    output_tokens: Count | None = None
    response_text: str | None = None
    response_hash: str | None = None
    finish_reason: str | None = None


class Variability(Struct, kw_only=True, gc=False):
    nondeterministic: bool | None = None
    reason: str | None = None


class Metrics(Struct, kw_only=True, gc=False):
    latency_ms: float | None = None
    cost_usd: float | None = None


class LlmCallEvent(Envelope, tag_field="event_type", tag="llm_call"):
    event_type: ClassVar[str] = "llm_call"
    reasoning: Reasoning | None = None
    model: Model | None = None
    input: LlmInput | None = None
    output: LlmOutput | None = None
    variability: Variability | None = None
    metrics: Metrics | None = None


# ---- decision parts --------------------------------------------------------------------------


class ReasonCount(Struct, kw_only=True, gc=False):
    count: Count | None = None
    reason: str | None = None


class DecisionPart(Struct, kw_only=True, gc=False):
    input_count: Count | None = None
    output_count: Count | None = None
    kept: list[ReasonCount] | None = None
    dropped: list[ReasonCount] | None = None


class DecisionEvent(Envelope, tag_field="event_type", tag="decision"):
    event_type: ClassVar[str] = "decision"
    decision: DecisionPart | None = None
    criteria: AnyObject | None = None


# ---- http_request parts ----------------------------------------------------------------------


class HttpRequestPart(Struct, kw_only=True, gc=False):
    method: str | None = None
    url: str | None = None


class HttpResponsePart(Struct, kw_only=True, gc=False):
    status: int | None = None


class HttpErrorPart(Struct, kw_only=True, gc=False):
    message: str | None = None
    code: str | int | None = None


class HttpRequestEvent(Envelope, tag_field="event_type", tag="http_request"):
    event_type: ClassVar[str] = "http_request"
    request: HttpRequestPart | None = None
    response: HttpResponsePart | None = None
    error: HttpErrorPart | None = None


# ---- custom events ---------------------------------------------------------------------------


class CustomEvent(Envelope):
    """Any other event_type (`logCustom(type, data)`)."""

    event_type: EventType
    data: AnyObject | None = None


KnownEvent = LlmCallEvent | DecisionEvent | HttpRequestEvent
Event = KnownEvent | CustomEvent
# Each known event's `event_type` is a class attribute holding its tag, so every Event has one.
KNOWN_EVENTS: Final = (LlmCallEvent, DecisionEvent, HttpRequestEvent)


class BatchRequest(Struct):
    events: list[Raw]


# ---- responses -------------------------------------------------------------------------------


class ItemError(Struct):
    index: int
    path: str
    message: str


class FieldError(Struct):
    path: str
    message: str


class ErrorBody(Struct, omit_defaults=True):
    error: str
    errors: list[FieldError] = []
    # On a 500 only: the id under which the log has the details.
    request_id: str | None = None


class EventAccepted(Struct):
    """A single event taken (202) or, in durable mode, committed (201)."""

    id: uuid.UUID
    trace_id: uuid.UUID
    message: str = "Event accepted"


class BatchAccepted(Struct):
    accepted: int
    count: int
    ids: list[uuid.UUID | None]
    errors: list[ItemError]
    message: str


class EventList(Struct):
    trace_id: uuid.UUID
    count: int
    events: list[Raw]


class TraceSummary(Struct):
    trace_id: uuid.UUID
    start_time: datetime
    end_time: datetime
    duration_ms: int
    event_count: int
    services: list[str]
    event_types: Raw


class AnalyticsWindow(Struct, kw_only=True):
    """Which events a query looks at (service, time range, metadata tags); None means any."""

    service: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    metadata_keys: list[str] = []
    metadata_values: list[str] = []


class TraceFilters(AnalyticsWindow, kw_only=True):
    """GET /v1/traces filters: the window's, plus these; None means no filter."""

    event_type: str | None = None
    min_duration_ms: float | None = None
    has_error: bool | None = None


class TraceDetail(TraceSummary):
    tree: list[dict[str, Any]]


class TracePage(Struct):
    traces: list[TraceSummary]
    next_cursor: str | None


class Readiness(Struct):
    ready: bool
    state: str
    queue_events: int
    queue_bytes: int
    queue_max_events: int
    queue_max_bytes: int


class Health(Struct):
    status: str
    timestamp: datetime
    database: str
    queue_events: int
    version: str
    # open (no key needed: a warning says so), required, or unknown (keys not read yet).
    auth: str
    warnings: list[str]


# ---- analytics answers -----------------------------------------------------------------------
# SQL renders these documents itself (sql/queries/fetch_*.sql); the Structs describe them for the
# OpenAPI document, and the tests check real answers against that description.


class HighDropDecision(Struct):
    trace_id: uuid.UUID
    span_id: uuid.UUID
    service: str | None
    timestamp: datetime
    input_count: int
    output_count: int
    drop_rate_percent: float
    metadata: dict[str, Any] | None


class HighDropTraces(Struct):
    threshold: float
    count: int
    traces: list[HighDropDecision]


class DropReason(Struct):
    reason: str | None
    total_count: int | None
    affected_traces: int
    occurrences: int
    avg_percentage: float | None


class DropReasons(Struct):
    count: int
    reasons: list[DropReason]


class FunnelStep(Struct):
    step: int
    span_id: uuid.UUID
    service: str | None
    timestamp: datetime
    input_count: int | None
    output_count: int | None
    drop_rate_percent: float | None
    cumulative_drop_rate_percent: float | None
    kept: list[Any]
    dropped: list[Any]


class Funnel(Struct):
    trace_id: uuid.UUID
    decision_count: int
    initial_input: int | None
    final_output: int | None
    cumulative_drop_rate: float | None
    funnel: list[FunnelStep]


class MetadataValue(Struct):
    value: Any
    count: int


class MetadataValues(Struct):
    field: str
    values: list[MetadataValue]


# ---- decoding --------------------------------------------------------------------------------

_KNOWN_DECODER: Final[msgspec.json.Decoder[KnownEvent]] = msgspec.json.Decoder(KnownEvent)
_CUSTOM_DECODER: Final = msgspec.json.Decoder(CustomEvent)
_BATCH_DECODER: Final[msgspec.json.Decoder[list[Raw] | BatchRequest]] = msgspec.json.Decoder(
    list[Raw] | BatchRequest
)
ENCODER: Final = msgspec.json.Encoder()

_NUL_ESCAPE: Final = b"\\u0000"
# A byte searched for as an int: `b"\\" in text` first tries b"\\" as an int, and the TypeError it
# formats and drops costs twice the search itself (1.8k instructions); a substring, find() it.
_BACKSLASH: Final = ord("\\")
# An escaped NUL is a backslash-u0000 preceded by an even number of backslashes (none included).
_REAL_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# JSON strings (escapes included) and the brackets left once they are removed.
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET: Final = re.compile(rb"[\[\]{}]")
_OPENERS: Final = frozenset(b"[{")
MAX_DEPTH: Final = 64
# Timestamps in years 1 and 9999 can leave Python's datetime range once moved to UTC or past the
# end of the event (timestamp + duration_ms), where the flusher and the readers compute in UTC.
FIRST_YEAR: Final = 2
LAST_YEAR: Final = 9998
_MISSING_FIELD: Final = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_TAG_PATH: Final = "$.event_type"


class InvalidEvent(Exception):
    """One event that failed validation, with the JSON path of the bad field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _split_error(exc: Exception) -> tuple[str, str]:
    """Turns msgspec's "message - at `$.path`" into (path, message), naming missing fields."""
    if isinstance(exc, RecursionError):
        return "$", "JSON is nested too deeply"
    text = str(exc)
    message, separator, path = text.rpartition(" - at `")
    if separator:
        path = path.rstrip("`")
    else:
        message, path = text, "$"
    missing = _MISSING_FIELD.match(message)
    if missing:
        path = f"{path}.{missing['field']}"
    return path, message


def _decode_other(raw: bytes | Raw, exc: msgspec.ValidationError) -> CustomEvent:
    """Decodes as a custom event what the known events refused with `exc`, which names a bad
    field unless it is the tag; raises InvalidEvent naming the bad field."""
    # Not one of the known tags (or no usable tag): decoding as a custom event also gives the
    # precise error for a missing, mistyped or over-long event_type.
    path, message = _split_error(exc)
    if path != _TAG_PATH:
        raise InvalidEvent(path, message) from None
    try:
        return _CUSTOM_DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError) as error:
        raise InvalidEvent(*_split_error(error)) from None


def known_event_types() -> list[str]:
    """The event_type values with a Struct of their own."""
    return [kind.event_type for kind in KNOWN_EVENTS]


def _may_escape_nul(text: bytes) -> bool:
    """Whether text holds the bytes "\\u0000" at all, a real escape or not: the cheap test before
    _REAL_NUL_ESCAPE. A search for a single byte (memchr) first: "\\u0000" ends in "0", which is
    everywhere in JSON, and so is slow to search for; most events have no backslash at all."""
    return _BACKSLASH in text and text.find(_NUL_ESCAPE) >= 0


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (1 for a flat object)."""
    deepest = depth = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub(b"", raw)):
        if bracket[0] in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def decode_row(raw: bytes | Raw, check_nul: bool = True, max_depth: int = MAX_DEPTH) -> Row:
    """Decodes one event into its COPY row; raises InvalidEvent naming the bad field.

    A missing span_id is generated and appended to the payload. One function, no helper calls
    on the way of a valid known event: in a batch of 1000 this runs 1000 times per request."""
    # First what msgspec accepts but PostgreSQL or we would not. Each scan of an event's bytes
    # costs about a microsecond per KB, so the exact checks run only past a cheap one.
    text = bytes(raw)
    if check_nul and _may_escape_nul(text) and _REAL_NUL_ESCAPE.search(text):
        raise InvalidEvent("$", "strings must not contain \\u0000 (PostgreSQL cannot store it)")
    # Nesting cannot exceed the number of opening brackets, counted up to one past the limit.
    # Counted as the bytes that deleting them removes: delete finds each one with memchr, where
    # count() compares every byte in a loop (a ~1 KB event with 8 braces and 1.5 brackets:
    # 250 ns against 610). The cap bounds the finds for a text full of brackets.
    beyond = max_depth + 1
    openers = len(text) - len(text.replace(b"{", b"", beyond).replace(b"[", b"", beyond))
    if openers > max_depth and nesting_depth(text) > max_depth:
        raise InvalidEvent("$", f"JSON is nested deeper than {max_depth} levels")
    event: Event
    try:
        event = _KNOWN_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        event = _decode_other(raw, exc)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidEvent(*_split_error(exc)) from None
    span_id = event.span_id
    data: bytes | Raw = raw
    if span_id is None:
        span_id = uuid.uuid4()
        # The payload is a non-empty object (it has the required fields), so it ends with "}".
        # Appended last, our span_id wins over a client's `"span_id": null` in jsonb.
        text = text.rstrip()
        data = b"".join((text[:-1], b',"span_id":"', str(span_id).encode(), b'"}'))
    timestamp = event.timestamp
    if not FIRST_YEAR <= timestamp.year <= LAST_YEAR:
        raise InvalidEvent("$.timestamp", f"must fall within the years {FIRST_YEAR} to {LAST_YEAR}")
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    duration = event.duration_ms
    return (
        span_id,
        event.event_type,
        event.trace_id,
        span_id,
        event.parent_span_id,
        event.service,
        timestamp,
        None if duration is None else round(duration),
        data,
    )


class DecodedBatch(Struct):
    rows: list[Row]
    ids: list[uuid.UUID | None]
    errors: list[ItemError]
    size: int


def split_batch(body: bytes, ndjson: bool) -> list[Raw] | list[bytes]:
    """Splits a batch body into its items; raises InvalidEvent for a body that is not a batch."""
    if ndjson:
        return [stripped for line in body.splitlines() if (stripped := line.strip())]
    try:
        decoded = _BATCH_DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidEvent(*_split_error(exc)) from None
    return decoded.events if isinstance(decoded, BatchRequest) else decoded


def decode_batch(
    body: bytes, ndjson: bool, max_items: int, max_depth: int = MAX_DEPTH
) -> DecodedBatch:
    """Decodes every item of a batch body, collecting a per-item error for each bad one.

    Raises InvalidEvent when the body is not a batch, BatchTooLargeError past max_items.
    """
    items = split_batch(body, ndjson)
    if len(items) > max_items:
        raise BatchTooLargeError(f"a batch holds at most {max_items} events, got {len(items)}")
    check_nul = _may_escape_nul(body)
    rows: list[Row] = []
    ids: list[uuid.UUID | None] = []
    errors: list[ItemError] = []
    size = 0
    for index, raw in enumerate(items):
        try:
            row = decode_row(raw, check_nul, max_depth)
        except InvalidEvent as exc:
            errors.append(ItemError(index, exc.path, exc.message))
            ids.append(None)
            continue
        rows.append(row)
        ids.append(row[3])
        size += len(raw)
    return DecodedBatch(rows, ids, errors, size)
