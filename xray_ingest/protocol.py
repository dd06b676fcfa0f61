"""uvicorn's httptools HTTP protocol, sending each response in one write instead of two, and
answering plain ingest POSTs (single events and batches) itself.

uvicorn writes the status line and headers when the app sends http.response.start, and the body
when it sends http.response.body: two send() calls, two TCP segments and two wake-ups of the
client for a small response such as an ingest 202. Here writes made within one event-loop
iteration are held and sent together at its end.

For each request uvicorn builds a RequestResponseCycle and starts an ASGI task, which the app then
answers through its receive and send messages: for an SDK's single-event POST that machinery cost
more than decoding and queueing the event, and a batch's body went to the app in pieces, each
copied twice, with reading paused after every 64 KB until the app took it. So a plain ingest POST
(`POST /v1/events` or `/v1/events/batch` over HTTP/1.1 keep-alive, no query, no compression, no
`Prefer`; routes.IngestLane.plain_length has the rest) is read here and handed to
routes.IngestLane.accept_plain, which queues its events; the answer is written here. Whatever that
declines (a key refused, an invalid single event, a body that is no batch, a full queue) is
replayed into uvicorn's own cycle with the body already read, so the app answers it as it answers
everything else.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from xray_ingest import routes
from xray_ingest.balance import ConnectionTally

logger = logging.getLogger(__name__)


@functools.cache
def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())


class JoinedWrites:
    """A transport whose writes within one loop iteration go out as one writelines() call.
    Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._send_pending)
        self._pending.append(data)

    def _send_pending(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def is_closing(self) -> bool:
        # uvicorn asks after every response: through __getattr__ (a failed lookup first) that
        # cost 4k more instructions per request.
        return self._transport.is_closing()

    def close(self) -> None:
        self._send_pending()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """Passed to uvicorn as its `http` protocol class."""

    # The body so far of the plain ingest POST being read, or None for any other request
    # (uvicorn's cycle has it).
    _plain_body: list[bytes] | None = None
    # uvicorn asked this connection to close while a plain POST was being read.
    _close_after_plain = False
    # The worker's count of its connections, when balance.BalancedListener accepted this one.
    tally: ConnectionTally | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        joined = JoinedWrites(transport, asyncio.get_running_loop())
        super().connection_made(joined)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tally is not None:
            self.tally.add(-1)
            self.tally = None
        super().connection_lost(exc)

    def _is_plain(self) -> bool:
        """Whether this request is a plain ingest POST, answered here."""
        lane: routes.IngestLane | None = getattr(self.app, "lane", None)
        if (
            lane is None
            or self.root_path
            or self.limit_concurrency is not None
            or self.parser.get_method() != b"POST"
            or self.parser.get_http_version() != "1.1"
            or not self.parser.should_keep_alive()
            or self.parser.should_upgrade()
            # The previous response still going out, or requests queued behind it: uvicorn keeps
            # them in order.
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.pipeline
            or self.flow.write_paused
        ):
            return False
        return lane.plain_length(self.url, self.headers) is not None

    def on_headers_complete(self) -> None:
        # A plain POST's answer, earlier in the same read, armed the idle timer: this request
        # is not idleness (uvicorn itself disarms it only as each read begins).
        self._unset_keepalive_if_required()
        if self._is_plain():
            self._plain_body = []
        else:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._plain_body is None:
            super().on_body(body)
        else:
            self._plain_body.append(body)

    def on_message_complete(self) -> None:
        if self._plain_body is None:
            super().on_message_complete()
            return
        parts, self._plain_body = self._plain_body, None
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            answer = self.app.lane.accept_plain(self.url, self.headers, body)
        except Exception:
            # The app's own path answers it (a 500 naming the request id, if it fails there too).
            logger.exception("answering an ingest POST in the protocol failed")
            answer = None
        if answer is None:
            self._replay(body)
            return
        request_id, status, document = answer
        head = [_status_line(status)]
        for name, value in self.server_state.default_headers:  # the date
            head += (name, b": ", value, b"\r\n")
        head.append(
            b"content-length: %d\r\ncontent-type: application/json\r\nx-request-id: %s\r\n\r\n"
            % (len(document), request_id)
        )
        head.append(document)
        self.transport.write(b"".join(head))
        if self._close_after_plain:
            self.transport.close()
        self.on_response_complete()

    def _replay(self, body: bytes) -> None:
        """Hands the request, its body already read, to uvicorn's cycle and the ASGI app."""
        super().on_headers_complete()
        if self._close_after_plain:
            self.cycle.keep_alive = False
        if body:
            super().on_body(body)
        super().on_message_complete()

    def shutdown(self) -> None:
        if self._plain_body is None:
            super().shutdown()
        else:  # answer the request being read, then close
            self._close_after_plain = True
