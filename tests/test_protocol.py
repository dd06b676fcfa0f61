"""The HTTP protocol's joined writes: one send per loop iteration, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import json

import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from tests import samples
from tests.samples import dumps
from xray_ingest.app import XrayApp, create_app
from xray_ingest.auth import KeyRing
from xray_ingest.buffer import Buffer
from xray_ingest.config import Settings
from xray_ingest.protocol import HttpProtocol, JoinedWrites


class RecordingTransport:
    """Keeps what reaches the socket, one entry per writelines() call."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def writelines(self, parts: list[bytes]) -> None:
        assert not self.closed, "written after close"
        self.sends.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 7


async def test_writes_in_one_iteration_go_out_together_and_in_order() -> None:
    transport = RecordingTransport()
    joined = JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    joined.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n")
    joined.write(b"{}")
    assert transport.sends == []
    await asyncio.sleep(0)
    assert transport.sends == [b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"]
    joined.write(b"next")
    await asyncio.sleep(0)
    assert transport.sends[1:] == [b"next"]


async def test_close_sends_what_is_pending_first() -> None:
    transport = RecordingTransport()
    joined = JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    joined.write(b"last response")
    joined.close()
    assert transport.sends == [b"last response"]
    assert transport.closed
    await asyncio.sleep(0)  # the scheduled send finds nothing left and writes nothing
    assert transport.sends == [b"last response"]


async def test_nothing_is_written_to_a_transport_already_closing() -> None:
    transport = RecordingTransport()
    joined = JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    joined.write(b"too late")
    transport.close()
    await asyncio.sleep(0)
    assert transport.sends == []


async def test_everything_else_is_the_wrapped_transports() -> None:
    transport = RecordingTransport()
    joined = JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    assert joined.get_write_buffer_size() == 7
    assert not joined.is_closing()


class Transport(RecordingTransport):
    """What uvicorn's protocol asks of a socket's transport, beyond the writes."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class LaneInFront:
    """The server's ingest lane (an open keyring, the given queue, no lifespan run) in front of
    an ASGI app that answers 204 and records the path of each request that reaches it."""

    def __init__(self, buffer: Buffer) -> None:
        keyring = KeyRing(always_required=False)
        keyring.replace([])
        app = create_app(Settings(database_url="postgresql://unused/unused"), keyring)
        assert isinstance(app, XrayApp)
        self.lane = app.lane
        self.lane.buffer = buffer
        self.buffer = buffer
        self.through_asgi: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.through_asgi.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def protocol_for(app: LaneInFront) -> tuple[HttpProtocol, Transport]:
    config = uvicorn.Config(
        app,
        http=HttpProtocol,
        loop="asyncio",
        lifespan="off",
        proxy_headers=False,  # as serve() runs it: the app unwrapped
    )
    config.load()
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def request(path: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (path, headers, len(body), body)
    )


async def test_plain_batches_are_answered_in_the_protocol_and_the_rest_the_asgi_way() -> None:
    app = LaneInFront(Buffer(max_events=10_000, max_bytes=10_000_000))
    protocol, transport = protocol_for(app)
    events = [samples.llm_call(), samples.decision()]
    # Arriving in pieces, as a large body does: answered once whole, without the app.
    whole = request(b"/v1/events/batch", dumps({"events": events}))
    for start in range(0, len(whole), 100):
        protocol.data_received(whole[start : start + 100])
    await asyncio.sleep(0)
    assert app.through_asgi == []
    head, _, document = transport.sends[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202 Accepted\r\n")
    answer = json.loads(document)
    assert answer["ids"] == [e["span_id"] for e in events]
    assert app.buffer.events == 2
    # Per-item errors are answered here too.
    protocol.data_received(request(b"/v1/events/batch", dumps([samples.custom(), {"x": 1}])))
    await asyncio.sleep(0)
    assert transport.sends[1].startswith(b"HTTP/1.1 207 Multi-Status\r\n")
    assert app.buffer.events == 3
    # Durable, or no batch at all: the app's way.
    protocol.data_received(
        request(b"/v1/events/batch", dumps([samples.custom()]), b"Prefer: wait\r\n")
    )
    protocol.data_received(request(b"/v1/events/batch", b'{"events": 3}'))
    for _ in range(5):
        await asyncio.sleep(0)
    assert app.through_asgi == ["/v1/events/batch", "/v1/events/batch"]
    assert app.buffer.events == 3


async def test_a_batch_the_queue_cannot_take_goes_the_asgi_way_before_its_body() -> None:
    app = LaneInFront(Buffer(max_events=10_000, max_bytes=500))
    protocol, transport = protocol_for(app)
    body = dumps([samples.custom(data={"text": "x" * 600})])
    protocol.data_received(request(b"/v1/events/batch", body)[: -len(body)])
    for _ in range(5):
        await asyncio.sleep(0)
    # The app answered from the headers alone.
    assert app.through_asgi == ["/v1/events/batch"]
    assert transport.sends[0].startswith(b"HTTP/1.1 204")
