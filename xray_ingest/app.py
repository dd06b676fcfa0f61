"""Builds the Starlette application: routes, error-to-status mapping, and the lifespan that opens
the pool and runs the flusher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from types import FrameType
from typing import Any, Final

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from xray_ingest import allocation, analytics, db, metrics, openapi, routes
from xray_ingest.auth import AuthMiddleware, KeyRing
from xray_ingest.buffer import Buffer, Flusher
from xray_ingest.config import Settings, load_settings
from xray_ingest.errors import (
    BadRequestError,
    BatchTooLargeError,
    BodyTooLargeError,
    CommitTimeoutError,
    ConfigError,
    MigrationError,
    QueueFullError,
    ShuttingDownError,
    UnsupportedEncodingError,
    XrayError,
)
from xray_ingest.migrate import pending_migrations
from xray_ingest.models import ErrorBody, FieldError
from xray_ingest.observe import AccessLog, ObserveMiddleware, Observer, request_id_of

logger = logging.getLogger(__name__)

# A connection stuck on an unreachable database must not hold up the exit.
POOL_CLOSE_TIMEOUT_S = 10


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return routes.MsgspecResponse(ErrorBody(message), status_code=status, headers=headers)


def _retry_later(request: Request, message: str) -> Response:
    retry_after = str(request.app.state.settings.retry_after_s)
    return _error(503, message, {"Retry-After": retry_after})


async def _unavailable(request: Request, exc: Exception) -> Response:
    return _retry_later(request, str(exc))


# Reads need the database; while it is away they answer 503 (never its driver's words).
_DATABASE_AWAY: Final = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,  # a query on a session the server just ended (see db.UNANSWERED)
)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning(
        "database unavailable for %s %s (%s)",
        request.method,
        request.url.path,
        type(exc).__name__,
        extra={"action": "request", "request_id": request_id_of(request.scope)},
    )
    return _retry_later(request, "the database is unavailable; retry shortly")


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequestError)
    return routes.MsgspecResponse(
        ErrorBody(str(exc), [FieldError(exc.path, str(exc))]), status_code=400
    )


async def _too_large(request: Request, exc: Exception) -> Response:
    return _error(413, str(exc))


async def _unsupported_encoding(request: Request, exc: Exception) -> Response:
    return _error(415, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail, exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return _error(400, "the client disconnected before sending the whole body")


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Says only that something failed, and the request id to find the details in the log:
    exception texts can quote SQL, file paths or the payload."""
    request_id = request_id_of(request.scope)
    logger.error(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=exc,
        extra={"action": "request", "request_id": request_id},
    )
    return routes.MsgspecResponse(
        ErrorBody("internal server error", request_id=request_id),
        status_code=500,
        headers={"X-Request-ID": request_id},
    )


async def _check_schema(pool: db.Pool) -> None:
    try:
        async with pool.acquire(timeout=10) as connection:
            pending = await pending_migrations(connection)
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError) as exc:
        logger.warning(
            "database unreachable at start (%s); events queue until it is back",
            exc,
            extra={"action": "start"},
        )
        return
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise MigrationError(
            f"database has pending migrations ({names}); run `xray-ingest migrate`"
        )


def _refuse_new_events_on_signals(buffer: Buffer) -> None:
    """On SIGINT/SIGTERM, first close the buffer (new events get 503, /ready turns 503), then
    hand the signal to the server's own handler, which stops listening, finishes the requests
    in flight and runs the lifespan's shutdown: the flusher's drain."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers live in the main thread; under a test client there is none
    for signum in (signal.SIGINT, signal.SIGTERM):
        server_handler = signal.getsignal(signum)

        def refuse_then_stop(
            number: int, frame: FrameType | None, server_handler: Any = server_handler
        ) -> None:
            buffer.closed = True
            logger.info("signal %d: no longer accepting events", number, extra={"action": "stop"})
            if callable(server_handler):
                server_handler(number, frame)

        signal.signal(signum, refuse_then_stop)


async def _load_keys(keyring: KeyRing, pool: db.Pool) -> None:
    try:
        await keyring.refresh(pool)
    except db.UNANSWERED as exc:
        logger.warning(
            "could not read API keys at start (%s); requests get 503 until they are read",
            type(exc).__name__,
            extra={"action": "auth"},
        )


def _middleware(settings: Settings, keyring: KeyRing, observer: Observer) -> list[Middleware]:
    """Outermost first: every request is observed; CORS answers preflights before auth. (The
    ingest POSTs mostly come in ahead of these: see XrayApp.)"""
    stack = [Middleware(ObserveMiddleware, observer=observer)]
    if settings.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=[
                    "Authorization",
                    "X-API-Key",
                    "Content-Type",
                    "Content-Encoding",
                    "Prefer",
                    "X-Request-ID",
                ],
                expose_headers=["X-Request-ID", "Retry-After"],
                max_age=600,
            )
        )
    stack.append(Middleware(AuthMiddleware, keyring=keyring))
    return stack


class XrayApp(Starlette):
    """Starlette, with the ingest POSTs taken down their lane (routes.IngestLane) before its
    middleware stack, whose layers and send wrappers a single-event POST otherwise passes
    (through the app in-process: 322.6k against 303.9k instructions a POST, callgrind)."""

    def __init__(self, ingest_lane: routes.IngestLane, **options: Any) -> None:
        super().__init__(**options)
        self.lane = ingest_lane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lane.lane_for(scope)
        if lane is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await self.lane.serve(lane, scope, receive, send)


def create_app(settings: Settings | None = None, keyring: KeyRing | None = None) -> Starlette:
    """Builds the app; with no settings, loads them from the environment (uvicorn's factory).
    A keyring already loaded stands for one read before the database went away."""
    if settings is None:
        settings = load_settings()
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set")
    dsn = settings.database_url
    if keyring is None:
        keyring = KeyRing(always_required=settings.auth == "required")
    access_log = AccessLog(settings.log_format) if settings.access_log else None
    tally = metrics.RequestTally(metrics.REQUESTS, metrics.REQUEST_SECONDS)
    observer = Observer(access_log, tally)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        allocation.tune_worker()
        pool = await db.create_pool(dsn, settings.copy_connections + settings.query_connections)
        try:
            await _check_schema(pool)
            buffer = Buffer(settings.queue_max_events, settings.queue_max_bytes)
            flusher = Flusher(
                buffer,
                db.PoolSink(pool),
                max_events=settings.flush_max_events,
                interval_s=settings.flush_interval_ms / 1000,
                connections=settings.copy_connections,
            )
            app.state.pool = pool
            app.state.buffer = buffer
            ingest_lane.buffer = buffer
            if settings.metrics_dir is not None:
                metrics.forget_dead_workers(settings.metrics_dir)
            await _load_keys(keyring, pool)
            flusher.start()
            background = [
                asyncio.create_task(keyring.refresh_forever(pool, settings.auth_refresh_s)),
                asyncio.create_task(metrics.sample_forever(buffer, pool, tally)),
            ]
            if access_log is not None:
                background.append(asyncio.create_task(access_log.flush_forever()))
            _refuse_new_events_on_signals(buffer)
            logger.info("xray-ingest ready", extra={"action": "start"})
            try:
                yield
            finally:
                await flusher.stop(settings.shutdown_timeout_s)
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
        finally:
            try:
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT_S)
            except TimeoutError:
                pool.terminate()

    # Routes are tried in order: the ingest routes, which take nearly every request, first (most
    # ingest POSTs skip the router: see routes.IngestLane).
    app_routes = [
        Route("/v1/events", routes.ingest_event, methods=["POST"]),
        Route("/v1/events/batch", routes.ingest_batch, methods=["POST"]),
        Route("/health", routes.health, methods=["GET"]),
        Route("/ready", routes.ready, methods=["GET"]),
        Route("/metrics", routes.metrics_text, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_document, methods=["GET"]),
        Route("/v1/events", routes.list_trace_events, methods=["GET"]),
        Route("/v1/events/{span_id}", routes.get_event, methods=["GET"]),
        Route("/v1/traces", routes.list_traces, methods=["GET"]),
        Route("/v1/traces/{trace_id}", routes.get_trace, methods=["GET"]),
        Route("/v1/analytics/high-drop-traces", analytics.high_drop_traces, methods=["GET"]),
        Route("/v1/analytics/drop-reasons", analytics.drop_reasons, methods=["GET"]),
        Route("/v1/analytics/funnel-stats", analytics.funnel_stats, methods=["GET"]),
        Route("/v1/analytics/metadata-values", analytics.metadata_values, methods=["GET"]),
    ]
    ingest_lane = routes.IngestLane(app_routes, keyring, observer, settings)
    app = XrayApp(
        ingest_lane,
        routes=app_routes,
        exception_handlers={
            QueueFullError: _unavailable,
            ShuttingDownError: _unavailable,
            CommitTimeoutError: _unavailable,
            UnsupportedEncodingError: _unsupported_encoding,
            BadRequestError: _bad_request,
            BodyTooLargeError: _too_large,
            BatchTooLargeError: _too_large,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            **dict.fromkeys(_DATABASE_AWAY, _database_unavailable),
            XrayError: _internal_error,
            Exception: _internal_error,
        },
        middleware=_middleware(settings, keyring, observer),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.request_tally = tally
    return app
