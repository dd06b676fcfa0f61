"""Per-request bookkeeping: the request id, the access log line and the request metrics."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xray_ingest import metrics

logger = logging.getLogger("xray_ingest.access")

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


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _CALLER_REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(8).hex().encode()


class ObserveMiddleware:
    """Gives every request an id (echoed in X-Request-ID), counts and times it by route and
    status, and logs one access line: request id, method, route, status and duration. Never the
    query string, a header or the body: they can carry keys, prompts or user data."""

    def __init__(self, app: ASGIApp, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log
        # Label children by (route, method, status): labels() takes a lock and builds a key.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope["headers"])
        scope[REQUEST_ID_KEY] = request_id.decode()
        # An exception escaping the app becomes a 500 further out (ServerErrorMiddleware).
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                # A 500 names its request id itself (it can also be sent from further out).
                if all(name != REQUEST_ID_HEADER for name, _ in headers):
                    message["headers"] = [*headers, (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        route_path: str = getattr(route, "path", UNMATCHED_ROUTE)
        method: str = scope["method"] if scope["method"] in _METHODS else "OTHER"
        key = (route_path, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                metrics.REQUESTS.labels(route_path, method, str(status)),
                metrics.REQUEST_SECONDS.labels(route_path),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if self.access_log:
            logger.info(
                "%s %s %d %.1fms",
                method,
                route_path,
                status,
                seconds * 1000,
                extra={
                    "action": "access",
                    "request_id": scope[REQUEST_ID_KEY],
                    "method": method,
                    "route": route_path,
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                },
            )
