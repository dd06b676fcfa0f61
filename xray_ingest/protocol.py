"""uvicorn's httptools HTTP protocol, sending each response in one write instead of two.

uvicorn writes the status line and headers when the app sends http.response.start, and the body
when it sends http.response.body: two send() calls, two TCP segments and two wake-ups of the
client for a small response such as an ingest 202. Here writes made within one event-loop
iteration are held and sent together at its end.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        joined = JoinedWrites(transport, asyncio.get_running_loop())
        super().connection_made(joined)  # type: ignore[arg-type]
