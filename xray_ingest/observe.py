"""Per-request bookkeeping: the request id, the access log line and the request metrics."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xray_ingest import metrics

ACCESS_LOGGER: Final = "xray_ingest.access"
FLUSH_INTERVAL_S: Final = 0.2
# Past this many buffered lines, add() writes at once (and so does shutdown).
MAX_BUFFERED_LINES: Final = 2_000

# Where the request id travels in the scope (our extension key) and in both directions over HTTP.
REQUEST_ID_KEY: Final = "xray.request_id"
REQUEST_ID_HEADER: Final = b"x-request-id"
# A caller's own id is kept when it is this plain; anything else gets a new one.
_CALLER_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
UNMATCHED_ROUTE: Final = "unmatched"
# Any other method is counted as OTHER, so a client cannot make up new label values.
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_id_of(scope: Scope) -> str:
    request_id: str = scope.get(REQUEST_ID_KEY, "-")
    return request_id


class AccessLog:
    """One line per request, in the format of the other log lines (text or JSON), written to
    stderr in batches every FLUSH_INTERVAL_S.

    Not through the logging module: a LogRecord, a Formatter, a lock and a write per line cost
    about 12 us a line, which took a quarter off single-event ingest (measured); this costs a
    few. The price: a crash can lose the last FLUSH_INTERVAL_S of access lines.
    """

    def __init__(self, log_format: str) -> None:
        self.json = log_format == "json"
        self.pid = os.getpid()
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def add(self, request_id: str, method: str, route: str, status: int, seconds: float) -> None:
        now = time.time()
        whole = int(now)
        if whole != self._second:  # formatting a time costs more than the rest of the line
            self._second = whole
            if self.json:
                self._stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole))
        millis = int((now - whole) * 1000)
        if self.json:
            ms = round(seconds * 1000, 2)
            line = orjson.dumps(
                {
                    "time": f"{self._stamp}.{millis:03d}+00:00",
                    "level": "INFO",
                    "logger": ACCESS_LOGGER,
                    "message": f"{method} {route} {status} {ms}ms",
                    "pid": self.pid,
                    "action": "access",
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "ms": ms,
                }
            ).decode()
        else:
            # printf-style on purpose: an f-string formats each int and float through its
            # __format__ (about 1.9k instructions each under callgrind), and round(x, 2) costs
            # as much again; this line took 890 -> 416 ns.
            line = "%s,%03d INFO %s: %s %s %d %.2fms request_id=%s" % (  # noqa: UP031
                self._stamp,
                millis,
                ACCESS_LOGGER,
                method,
                route,
                status,
                seconds * 1000,
                request_id,
            )
        self._lines.append(line)
        if len(self._lines) >= MAX_BUFFERED_LINES:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    async def flush_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_S)
                self.flush()
        finally:
            self.flush()


# Request ids: this process's random prefix and a counter, unique without a syscall each.
_ID_PREFIX: Final = os.urandom(4).hex().encode()
_id_counter = itertools.count(1)


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _CALLER_REQUEST_ID.fullmatch(value):
            return value
    return b"%s%08x" % (_ID_PREFIX, next(_id_counter))


def names_request_id(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether response headers already carry an X-Request-ID (a 500 names its own)."""
    return any(name == REQUEST_ID_HEADER for name, _ in headers)


def assign_request_id(scope: Scope) -> bytes:
    """Gives the request its id (the caller's, when plain enough) in the scope; returns it as
    the X-Request-ID header value."""
    request_id = _request_id(scope["headers"])
    scope[REQUEST_ID_KEY] = request_id.decode()
    return request_id


class Observer:
    """Counts and times each request by route and status, and logs its access line: request
    id, method, route, status and duration. Never the query string, a header or the body: they
    can carry keys, prompts or user data."""

    def __init__(self, access_log: AccessLog | None, tally: metrics.RequestTally) -> None:
        self.access_log = access_log
        self.tally = tally

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        route_path: str = getattr(route, "path", UNMATCHED_ROUTE)
        method: str = scope["method"] if scope["method"] in _METHODS else "OTHER"
        self.tally.add(route_path, method, status, seconds)
        if self.access_log is not None:
            self.access_log.add(scope[REQUEST_ID_KEY], method, route_path, status, seconds)


class ObserveMiddleware:
    """Gives every request an id (echoed in X-Request-ID) and has the Observer record it (the
    ingest POSTs get the same from routes.IngestLane, ahead of the middleware)."""

    def __init__(self, app: ASGIApp, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = assign_request_id(scope)
        # An exception escaping the app becomes a 500 further out (ServerErrorMiddleware).
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                # A 500 names its request id itself (it can also be sent from further out).
                if status != 500 or not names_request_id(headers):
                    message["headers"] = [*headers, (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.observer.record(scope, status, time.perf_counter() - started)
