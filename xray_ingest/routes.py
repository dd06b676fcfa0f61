"""The HTTP endpoints: read the body bytes, decode, enqueue or query, respond."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

from asyncpg import Record
from msgspec import Struct
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from xray_ingest import __version__, db, metrics
from xray_ingest.auth import OPEN_WARNING, KeyRing
from xray_ingest.bodies import is_uncompressed, read_body
from xray_ingest.buffer import Buffer, Refusals
from xray_ingest.config import Settings
from xray_ingest.errors import BadRequestError, BatchTooLargeError, CommitTimeoutError
from xray_ingest.models import (
    ENCODER,
    BatchAccepted,
    DecodedBatch,
    ErrorBody,
    EventAccepted,
    EventList,
    FieldError,
    Health,
    InvalidEvent,
    ItemError,
    Readiness,
    Row,
    TraceDetail,
    TracePage,
    TraceSummary,
    decode_batch,
    decode_row,
)
from xray_ingest.observe import (
    REQUEST_ID_HEADER,
    Observer,
    assign_request_id,
    names_request_id,
)
from xray_ingest.params import decode_cursor, encode_cursor, int_param, trace_filters, uuid_param
from xray_ingest.tree import build_forest

NDJSON_TYPES: Final = ("application/x-ndjson", "application/ndjson", "application/jsonl")
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
HEALTH_TIMEOUT_S: Final = 2.0
READY_TIMEOUT_S: Final = 1.0
# Deliberately without the database's own words (they can quote the payload or the schema).
REFUSED: Final = "the database refused this event; it was kept in dead_letter_events"


class MsgspecResponse(Response):
    """A JSON response rendered by the shared msgspec encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return ENCODER.encode(content)


class RawJsonResponse(Response):
    """A JSON document the database rendered, passed through as it is."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return bytes(content)


def _buffer(request: Request) -> Buffer:
    buffer: Buffer = request.app.state.buffer
    return buffer


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def pool_of(request: Request) -> db.Pool:
    pool: db.Pool = request.app.state.pool
    return pool


# An ingest handler: reads the request from the scope and receive, queues its events in the
# worker's buffer, and returns the status and the document to answer with (errors it raises go
# to the app's exception handlers).
IngestHandler: TypeAlias = Callable[
    [Scope, Receive, Buffer, Settings], Awaitable[tuple[int, Struct]]
]


_JSON: Final = MsgspecResponse.media_type.encode()


# The app's exception handlers (app.py): all async, all for HTTP requests.
ErrorHandler: TypeAlias = Callable[[Request, Exception], Awaitable[Response]]


def _handler_for(handlers: Mapping[Any, ErrorHandler], exc: Exception) -> ErrorHandler | None:
    """The app's handler for exc, looked up by its class and then its bases as Starlette does;
    None when only the catch-all one (a 500) would take it."""
    for kind in type(exc).__mro__:
        if kind is Exception:
            return None
        if kind in handlers:
            return handlers[kind]
    return None


class IngestEndpoint:
    """An ingest route as a plain ASGI app: no Request and no Response object for each of the
    many small requests an SDK sends. Errors its handler raises get the response of the app's
    handler for them, as they would through Starlette's exception middleware (which IngestLane
    skips); those that only the catch-all handles propagate, to be answered 500 further out."""

    def __init__(self, handler: IngestHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.answer(scope, receive, send)

    async def answer(
        self, scope: Scope, receive: Receive, send: Send, request_id: bytes | None = None
    ) -> int:
        """Handles the request and sends the response, with an X-Request-ID header when given
        the id; returns the status sent."""
        app = scope["app"]
        try:
            status, document = await self.handler(
                scope, receive, app.state.buffer, app.state.settings
            )
        except Exception as exc:
            on_error = _handler_for(app.exception_handlers, exc)
            if on_error is None:
                raise
            response = await on_error(Request(scope, receive), exc)
            return await _send_response(response, scope, receive, send, request_id)
        content = ENCODER.encode(document)
        headers = [(b"content-length", b"%d" % len(content)), (b"content-type", _JSON)]
        if request_id is not None:
            headers.append((REQUEST_ID_HEADER, request_id))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return status


async def _send_response(
    response: Response, scope: Scope, receive: Receive, send: Send, request_id: bytes | None
) -> int:
    if request_id is not None and not names_request_id(response.raw_headers):
        response.raw_headers.append((REQUEST_ID_HEADER, request_id))
    await response(scope, receive, send)
    return response.status_code


# An ingest route and its endpoint.
Lane: TypeAlias = tuple[Route, IngestEndpoint]

# The ingest routes, and the largest single-event body that the HTTP protocol may answer itself
# (IngestLane.accept_plain): an SDK's event is about 1 KB; a larger one goes the ASGI way.
SINGLE_EVENT_PATH: Final = "/v1/events"
BATCH_PATH: Final = "/v1/events/batch"
SINGLE_EVENT_PATH_BYTES: Final = SINGLE_EVENT_PATH.encode()
BATCH_PATH_BYTES: Final = BATCH_PATH.encode()
PLAIN_EVENT_MAX_BYTES: Final = 65_536
# Headers that make an ingest POST go the ASGI way: a compressed or chunked body, a durable
# request (Prefer: wait), a client waiting for 100 Continue.
_NOT_PLAIN: Final = frozenset({b"content-encoding", b"transfer-encoding", b"prefer", b"expect"})

# What the lane answers a plain POST with: the request id, the status and the JSON document.
PlainAnswer: TypeAlias = tuple[bytes, int, bytes]


class IngestLane:
    """Takes the ingest POSTs, nearly every request a server gets, straight to their endpoints
    ahead of Starlette's middleware stack (see app.XrayApp), and does for them what the stack
    would: the request id and the Observer's record (ObserveMiddleware), the key check
    (AuthMiddleware), the app's error responses (its exception middlewares); without the
    router, the layers and their send wrappers. Every other request goes the usual way, and so
    do ingest POSTs under a root path, and those from a browser when CORS is on (they carry an
    Origin header, which CORSMiddleware answers).

    Plain ingest POSTs (see plain_length) skip even the ASGI cycle: the HTTP protocol
    (protocol.HttpProtocol) reads their body and hands it to accept_plain."""

    def __init__(
        self,
        routes: Iterable[BaseRoute],
        keyring: KeyRing,
        observer: Observer,
        settings: Settings,
    ) -> None:
        self.lanes: dict[str, Lane] = {
            route.path: (route, route.endpoint)
            for route in routes
            if isinstance(route, Route)
            and isinstance(route.endpoint, IngestEndpoint)
            and "POST" in (route.methods or ())
        }
        self.keyring = keyring
        self.observer = observer
        self.settings = settings
        self.cors = bool(settings.cors_origins)
        # The worker's queue, once the lifespan has made it; the lane declines until then.
        self.buffer: Buffer | None = None
        # The largest body of each ingest path that the HTTP protocol may read itself; a
        # larger one goes the ASGI way, which answers 413 past XRAY_MAX_BODY_BYTES.
        self.plain_max_bytes: dict[bytes, int] = {
            SINGLE_EVENT_PATH_BYTES: min(PLAIN_EVENT_MAX_BYTES, settings.max_body_bytes),
            BATCH_PATH_BYTES: settings.max_body_bytes,
        }

    def plain_length(self, path: bytes, headers: list[tuple[bytes, bytes]]) -> int | None:
        """The declared length of an ingest POST's body to `path` when the HTTP protocol may
        read and answer it itself (protocol.HttpProtocol has checked the method, the query and
        the framing), else None: another path, a header in _NOT_PLAIN, an Origin under CORS, no
        Content-Length or one past plain_max_bytes (PLAIN_EVENT_MAX_BYTES for a single event,
        XRAY_MAX_BODY_BYTES), or a queue that could not take such a body (the ASGI way answers
        503 then, without reading it)."""
        limit = self.plain_max_bytes.get(path)
        buffer = self.buffer
        if limit is None or buffer is None:
            return None
        length = None
        for name, value in headers:
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif name in _NOT_PLAIN or (self.cors and name == b"origin"):
                return None
        if length is None or length > limit or buffer.closed or not buffer.has_room(1, length):
            return None
        return length

    def accept_plain(
        self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> PlainAnswer | None:
        """Answers a plain ingest POST (see plain_length) without an ASGI cycle, for the HTTP
        protocol: queues its events and records the request as serve() does. Returns None,
        having queued and recorded nothing, when the request must go the ASGI way after all,
        which builds the answer: a key refused, an empty body, an invalid single event or a
        body that is no batch, a closed or full queue."""
        started = time.perf_counter()
        buffer = self.buffer
        settings = self.settings
        if buffer is None or self.keyring.refusal("POST", headers) is not None:
            return None
        if buffer.closed or not buffer.has_room(1, len(body)) or not body.strip():
            return None
        if path == BATCH_PATH_BYTES:
            answer = _plain_batch(body, headers, buffer, settings)
            route_path = BATCH_PATH
        else:
            answer = _plain_event(body, buffer, settings)
            route_path = SINGLE_EVENT_PATH
        if answer is None:
            return None
        status, document = answer
        route, _ = self.lanes[route_path]
        scope = {"type": "http", "method": "POST", "headers": headers, "route": route}
        request_id = assign_request_id(scope)
        self.observer.record(scope, status, time.perf_counter() - started)
        return request_id, status, ENCODER.encode(document)

    def lane_for(self, scope: Scope) -> Lane | None:
        """The ingest route and endpoint this request takes the lane to, or None."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        lane = self.lanes.get(scope["path"])
        if lane is not None and self.cors and _header(scope, b"origin") is not None:
            return None
        return lane

    async def serve(self, lane: Lane, scope: Scope, receive: Receive, send: Send) -> None:
        route, endpoint = lane
        started = time.perf_counter()
        request_id = assign_request_id(scope)
        # What the router would have added to the scope.
        scope["route"] = route
        scope["endpoint"] = endpoint
        scope["path_params"] = {}
        status = 500
        try:
            refusal = self.keyring.refusal(scope["method"], scope["headers"])
            if refusal is not None:
                status = await _send_response(refusal, scope, receive, send, request_id)
                return
            try:
                status = await endpoint.answer(scope, receive, send, request_id)
            except Exception as exc:
                # The app's catch-all handler: a 500 that names the request id.
                on_error = scope["app"].exception_handlers[Exception]
                response = await on_error(Request(scope, receive), exc)
                status = await _send_response(response, scope, receive, send, request_id)
        finally:
            self.observer.record(scope, status, time.perf_counter() - started)


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header (name in lower case) read straight from the scope: on the ingest path
    Starlette's Headers mapping costs more, mostly in the KeyError of each absent header."""
    return _header_in(scope["headers"], name)


def _header_in(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_ingest_body(scope: Scope, receive: Receive, buffer: Buffer, limit: int) -> bytes:
    encoding = _header(scope, b"content-encoding") or ""
    declared = _header(scope, b"content-length")
    # Refuse before reading anything when no event could be taken, or when an uncompressed body
    # of a declared length could not fit (a saturated server read each refused batch whole,
    # a megabyte for 1000 events, only to throw it away).
    length = int(declared) if declared and declared.isdigit() else 0
    buffer.check_open(length if is_uncompressed(encoding) else 0)
    body = await read_body(receive, encoding, declared, limit)
    if not body.strip():
        raise BadRequestError("request body is empty; send a JSON event")
    # The events' bytes cannot exceed the body's: refuse what cannot fit before decoding it
    # (a saturated server otherwise spent most of its time decoding batches it then refused).
    buffer.check_open(len(body))
    return body


def _durable_deadline(scope: Scope, longest_s: float) -> float | None:
    """Seconds to wait for the commit when the client asked for it (`?wait=true`, or a
    `Prefer: wait` / `Prefer: wait=N` header, capped at longest_s), else None."""
    # Raw bytes first: parsing the query and headers of every request costs the hot path. find(),
    # not `b"wait" in query`, which first tries b"wait" as an int (see models._BACKSLASH).
    query: bytes = scope["query_string"]
    if query.find(b"wait") >= 0:
        wait = QueryParams(query).get("wait", "").lower()
        if wait in ("true", "1", "yes"):
            return longest_s
    for name, raw in scope["headers"]:
        if name != b"prefer":
            continue
        for preference in raw.decode("latin-1").split(","):
            key, _, value = preference.strip().partition("=")
            if key.strip().lower() == "wait":
                value = value.strip().strip('"')
                return min(longest_s, float(value)) if value.isdigit() else longest_s
    return None


async def _enqueue(
    scope: Scope, buffer: Buffer, settings: Settings, rows: list[Row], size: int
) -> Refusals | None:
    """Queues rows; in durable mode waits for their commit and returns the refused ones."""
    deadline = _durable_deadline(scope, settings.durable_timeout_s)
    if deadline is None:
        buffer.put(rows, size)
        return None
    committed: asyncio.Future[Refusals] = asyncio.get_running_loop().create_future()
    buffer.put(rows, size, committed)
    try:
        return await asyncio.wait_for(asyncio.shield(committed), deadline)
    except TimeoutError:
        raise CommitTimeoutError(
            f"the events were not committed within {deadline:g}s; they stay queued, and "
            "retrying the request is safe (stored events are not stored twice)"
        ) from None


async def _ingest_event(
    scope: Scope, receive: Receive, buffer: Buffer, settings: Settings
) -> tuple[int, Struct]:
    """POST /v1/events: one event object."""
    body = await _read_ingest_body(scope, receive, buffer, settings.max_body_bytes)
    try:
        row = decode_row(body, max_depth=settings.max_depth)
    except InvalidEvent as exc:
        metrics.EVENTS_REJECTED.inc()
        message = f"invalid event: {exc.message} at {exc.path}"
        return 400, ErrorBody(message, [FieldError(exc.path, exc.message)])
    refused = await _enqueue(scope, buffer, settings, [row], len(body))
    if refused:
        return 400, ErrorBody(REFUSED, [FieldError("$", REFUSED)])
    accepted = EventAccepted(id=row[3], trace_id=row[2])
    if refused is None:
        return 202, accepted
    accepted.message = "Event committed"
    return 201, accepted


async def _ingest_batch(
    scope: Scope, receive: Receive, buffer: Buffer, settings: Settings
) -> tuple[int, Struct]:
    """POST /v1/events/batch: {"events": [...]}, a bare JSON array, or NDJSON lines."""
    body = await _read_ingest_body(scope, receive, buffer, settings.max_body_bytes)
    ndjson = _is_ndjson(_header(scope, b"content-type") or "")
    try:
        batch = decode_batch(body, ndjson, settings.max_batch_events, settings.max_depth)
    except InvalidEvent as exc:
        message = (
            f'invalid batch: {exc.message} at {exc.path}; send {{"events": [...]}}, '
            "a JSON array or NDJSON"
        )
        return 400, ErrorBody(message, [FieldError(exc.path, exc.message)])
    if not batch.ids:
        return 400, ErrorBody("batch is empty", [FieldError("$.events", "no events in the batch")])
    if batch.errors:
        metrics.EVENTS_REJECTED.inc(len(batch.errors))
    refused = (
        await _enqueue(scope, buffer, settings, batch.rows, batch.size) if batch.rows else None
    )
    if refused:
        _mark_refused(batch, refused)
    return _batch_outcome(batch, refused)


def _is_ndjson(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in NDJSON_TYPES


def _batch_outcome(batch: DecodedBatch, refused: Refusals | None) -> tuple[int, Struct]:
    """The answer to a decoded batch whose events were queued (refused None: fast mode) or
    committed (refused: the rows the database refused, already marked in batch)."""
    accepted = len(batch.ids) - len(batch.errors)
    verb = "accepted" if refused is None else "committed"
    if not batch.errors:
        status, message = (202 if refused is None else 201), f"{accepted} events {verb}"
    elif accepted:
        status, message = 207, f"{accepted} events {verb}, {len(batch.errors)} rejected"
    else:
        status, message = 400, f"all {len(batch.errors)} events rejected"
    return status, BatchAccepted(accepted, accepted, batch.ids, batch.errors, message)


def _plain_event(body: bytes, buffer: Buffer, settings: Settings) -> tuple[int, Struct] | None:
    """A plain single-event POST queued (202), or None for an invalid event or a full queue."""
    try:
        row = decode_row(body, max_depth=settings.max_depth)
    except InvalidEvent:
        return None
    buffer.put([row], len(body))  # room was checked by the caller, in this loop iteration
    return 202, EventAccepted(id=row[3], trace_id=row[2])


def _plain_batch(
    body: bytes, headers: list[tuple[bytes, bytes]], buffer: Buffer, settings: Settings
) -> tuple[int, Struct] | None:
    """A plain batch POST queued (202, or 207 and 400 with per-item errors), or None for a body
    that is no batch, an empty or too large one, or a queue without room for its events."""
    ndjson = _is_ndjson(_header_in(headers, b"content-type") or "")
    try:
        batch = decode_batch(body, ndjson, settings.max_batch_events, settings.max_depth)
    except (InvalidEvent, BatchTooLargeError):
        return None
    if not batch.ids or not buffer.has_room(len(batch.rows), batch.size):
        return None
    if batch.errors:
        metrics.EVENTS_REJECTED.inc(len(batch.errors))
    if batch.rows:
        buffer.put(batch.rows, batch.size)
    return _batch_outcome(batch, None)


ingest_event: Final = IngestEndpoint(_ingest_event)
ingest_batch: Final = IngestEndpoint(_ingest_batch)


def _mark_refused(batch: DecodedBatch, refused: Refusals) -> None:
    """Turns rows the database refused (now in dead_letter_events) into per-item errors."""
    positions = [index for index, span_id in enumerate(batch.ids) if span_id is not None]
    for row_index, _reason in refused:
        index = positions[row_index]
        batch.ids[index] = None
        batch.errors.append(ItemError(index, "$", REFUSED))
    batch.errors.sort(key=lambda error: error.index)


async def list_trace_events(request: Request) -> Response:
    """GET /v1/events?trace_id=: the trace's events in time order."""
    trace_id = uuid_param(request.query_params.get("trace_id"), "trace_id")
    records = await db.fetch_trace_events(pool_of(request), trace_id)
    return MsgspecResponse(EventList(trace_id, len(records), [r["data"] for r in records]))


async def get_event(request: Request) -> Response:
    """GET /v1/events/{span_id}: one stored event."""
    span_id = uuid_param(request.path_params["span_id"], "span_id")
    event = await db.fetch_event(pool_of(request), span_id)
    if event is None:
        return MsgspecResponse(ErrorBody(f"no event with span_id {span_id}"), status_code=404)
    return MsgspecResponse(event)


def _summary_fields(record: Record) -> dict[str, Any]:
    """A trace_summaries row as TraceSummary's fields."""
    span: timedelta = record["end_time"] - record["start_time"]
    return {
        "trace_id": record["trace_id"],
        "start_time": record["start_time"],
        "end_time": record["end_time"],
        "duration_ms": round(span.total_seconds() * 1000),
        "event_count": record["event_count"],
        "services": record["services"],
        "event_types": record["event_types"],
    }


async def list_traces(request: Request) -> Response:
    """GET /v1/traces: traces newest first, filtered, paged by an opaque keyset cursor."""
    params = request.query_params
    page_size = int_param(params, "limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    after = decode_cursor(params.get("cursor"))
    filters = trace_filters(params)
    records = await db.fetch_traces_page(pool_of(request), *after, page_size, filters)
    traces = [TraceSummary(**_summary_fields(record)) for record in records]
    next_cursor = None
    if len(traces) == page_size:
        next_cursor = encode_cursor(traces[-1].start_time, traces[-1].trace_id)
    return MsgspecResponse(TracePage(traces, next_cursor))


async def get_trace(request: Request) -> Response:
    """GET /v1/traces/{trace_id}: the trace's summary and its events as a tree."""
    trace_id = uuid_param(request.path_params["trace_id"], "trace_id")
    pool = pool_of(request)
    summary = await db.fetch_trace_summary(pool, trace_id)
    if summary is None:
        return MsgspecResponse(ErrorBody(f"no trace with trace_id {trace_id}"), status_code=404)
    events = await db.fetch_trace_events(pool, trace_id)
    tree = build_forest([(e["span_id"], e["parent_span_id"], e["data"]) for e in events])
    return MsgspecResponse(TraceDetail(**_summary_fields(summary), tree=tree))


async def health(request: Request) -> Response:
    """GET /health: always 200 while the process runs (liveness); `status` says whether all is
    well, and `warnings` says when auth is off."""
    database_time = await db.ping(pool_of(request), HEALTH_TIMEOUT_S)
    buffer = _buffer(request)
    keyring: KeyRing = request.app.state.keyring
    ok = database_time is not None
    return MsgspecResponse(
        Health(
            status="ok" if ok else "degraded",
            timestamp=datetime.now(UTC),
            database="ok" if ok else "unreachable",
            queue_events=buffer.events,
            version=__version__,
            auth=keyring.state,
            warnings=[OPEN_WARNING] if keyring.state == "open" else [],
        )
    )


def _readiness_state(buffer: Buffer, database_ok: bool) -> str:
    if buffer.closed:
        return "shutting down"
    if not database_ok:  # the cause of a full queue too, when both hold
        return "database unreachable"
    return "accepting" if buffer.is_ready() else "queue full"


async def ready(request: Request) -> Response:
    """GET /ready: 200 when the database answers and the queue has room, else 503 (database
    unreachable, queue 90% full, or shutting down). Events posted directly still queue during
    a database outage; this tells a load balancer to prefer another instance meanwhile."""
    buffer = _buffer(request)
    database_ok = await db.ping(pool_of(request), READY_TIMEOUT_S) is not None
    state = _readiness_state(buffer, database_ok)
    readiness = Readiness(
        ready=state == "accepting",
        state=state,
        queue_events=buffer.events,
        queue_bytes=buffer.bytes,
        queue_max_events=buffer.max_events,
        queue_max_bytes=buffer.max_bytes,
    )
    return MsgspecResponse(readiness, status_code=200 if readiness.ready else 503)


async def metrics_text(request: Request) -> Response:
    """GET /metrics: every metric in Prometheus' text format."""
    metrics.sample(_buffer(request), pool_of(request), request.app.state.request_tally)
    body = metrics.exposition(_settings(request).metrics_dir)
    return Response(body, media_type=metrics.CONTENT_TYPE)
