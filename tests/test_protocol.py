"""The HTTP protocol's joined writes: one send per loop iteration, nothing lost or reordered."""

from __future__ import annotations

import asyncio

from xray_ingest.protocol import JoinedWrites


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
