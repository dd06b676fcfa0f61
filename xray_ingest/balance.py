"""An even share of connections between uvicorn's worker processes.

With several workers, uvicorn's processes all listen on one socket, and libuv, woken by a new
connection, accepts every connection waiting in the worker that runs first. A client's pool
opening 8 connections at once so landed all 8 in one worker, 20 bursts out of 20 (64 at once:
from 27 / 37 to 0 / 64 in 10 bursts), and that worker served every request of theirs.

Here each worker accepts connections itself, one per wake-up. While it holds more connections
than another live worker, it leaves a waiting connection to the others: it looks again every
millisecond, takes the connection as soon as it no longer holds more (the others took theirs
meanwhile), and takes it anyway after YIELD_S (the others are busy or stuck). Each worker writes
its count of open connections to a file named after its pid, in the folder that `serve` creates
for the run (Settings.connections_dir), where the others read it.

uvicorn lets a custom event loop be named (its `loop` option): BalancedLoop is uvloop's loop
with a create_server that, given the shared socket, returns a BalancedListener instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from xray_ingest.config import load_settings
from xray_ingest.workers import fresh_folder_for_workers, pid_alive

logger = logging.getLogger(__name__)

# How long a worker holding more than its share leaves a waiting connection to the others, and
# how often meanwhile it looks again whether it still does and the connection still waits.
YIELD_S = 0.02
_RECHECK_S = 0.001
# accept() failing (for want of descriptors or memory, say): listening stops this long, instead
# of the loop waking again at once for the same connection.
_ACCEPT_ERROR_PAUSE_S = 0.5
_COUNT_BYTES = 4


def share_connections_between(workers: int) -> None:
    """Called before uvicorn starts its workers: several workers count their connections in a
    fresh folder (XRAY_CONNECTIONS_DIR, read by each worker's settings), removed at exit."""
    if workers > 1:
        fresh_folder_for_workers("XRAY_CONNECTIONS_DIR", "xray-connections-")


class ConnectionTally:
    """This worker's count of open connections, kept in `folder/<pid>`, and the other
    workers' counts, read from their files there."""

    def __init__(self, folder: Path, pid: int | None = None) -> None:
        self._folder = folder
        self._name = str(os.getpid() if pid is None else pid)
        # None once closed: the connections still open when the worker stops listening are
        # counted on, but no longer shared.
        self._fd: int | None = os.open(
            folder / self._name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        self.held = 0
        self._write()

    def _write(self) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, self.held.to_bytes(_COUNT_BYTES, "little"), 0)

    def add(self, change: int) -> None:
        self.held += change
        self._write()

    def fewest_elsewhere(self) -> int | None:
        """The fewest connections any other live worker holds; None when there is none.
        A dead worker's file (a worker killed before it could remove it) is removed."""
        fewest: int | None = None
        with os.scandir(self._folder) as entries:
            for entry in entries:
                if entry.name == self._name or not entry.name.isdigit():
                    continue
                if not pid_alive(int(entry.name)):
                    Path(entry.path).unlink(missing_ok=True)
                    continue
                try:
                    count = int.from_bytes(Path(entry.path).read_bytes()[:_COUNT_BYTES], "little")
                except FileNotFoundError:  # that worker has just stopped
                    continue
                fewest = count if fewest is None else min(fewest, count)
        return fewest

    def holds_more_than_share(self) -> bool:
        fewest = self.fewest_elsewhere()
        return fewest is not None and self.held > fewest

    def close(self) -> None:
        """Stops sharing the count (the worker no longer accepts connections)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            (self._folder / self._name).unlink(missing_ok=True)


class BalancedListener(asyncio.AbstractServer):
    """Accepts connections from a listening socket that other workers share, as above.

    The protocol factory's protocols must call `tally.add(-1)` once their connection is lost
    (protocol.HttpProtocol does, through its `tally` attribute, which is set here)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        tally: ConnectionTally,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol_factory = protocol_factory
        self.tally = tally
        self._serving = False
        self._closed = False
        self._connecting: set[asyncio.Task[None]] = set()
        # Whether a connection is still waiting, asked without accepting it.
        self._waiting = select.poll()
        self._waiting.register(sock.fileno(), select.POLLIN)
        self._yield_until = 0.0

    def start(self, backlog: int) -> None:
        self._sock.setblocking(False)
        self._sock.listen(backlog)
        self._serving = True
        self._loop.add_reader(self._sock.fileno(), self._on_waiting)

    def _on_waiting(self) -> None:
        """A connection is waiting (for this worker or another)."""
        if self.tally.holds_more_than_share():
            self._loop.remove_reader(self._sock.fileno())
            self._yield_until = self._loop.time() + YIELD_S
            self._loop.call_later(_RECHECK_S, self._recheck)
            return
        if not self._accept_one():
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_later(_ACCEPT_ERROR_PAUSE_S, self._listen_again)

    def _recheck(self) -> None:
        """While yielding: listens again once another worker took the connection; takes it when
        this worker no longer holds more than its share (the others took theirs meanwhile) or
        when the yield is over."""
        if self._closed:
            return
        if not self._waiting.poll(0):
            self._listen_again()
        elif self.tally.holds_more_than_share() and self._loop.time() < self._yield_until:
            self._loop.call_later(_RECHECK_S, self._recheck)
        elif self._accept_one():
            self._listen_again()
        else:
            self._loop.call_later(_ACCEPT_ERROR_PAUSE_S, self._listen_again)

    def _listen_again(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_waiting)

    def _accept_one(self) -> bool:
        """Accepts one waiting connection, if one still waits; False when accept() failed
        (out of descriptors or memory, say), after which listening pauses."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True  # another worker took it, or the client gave up
        except OSError as exc:
            # Raised, it would end listening for good when it came in _recheck.
            logger.error("accepting a connection failed: %s", exc)
            return False
        self.tally.add(1)
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return True

    def _new_protocol(self) -> asyncio.BaseProtocol:
        protocol = self._protocol_factory()
        protocol.tally = self.tally  # type: ignore[attr-defined]
        return protocol

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._new_protocol, sock=conn)
        except BaseException:
            # No protocol will report this connection lost.
            self.tally.add(-1)
            conn.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False
        self.tally.close()

    async def wait_closed(self) -> None:
        # uvicorn itself waits for its connections to finish.
        if self._connecting:
            await asyncio.wait(self._connecting)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        pass  # serving since start()

    async def serve_forever(self) -> None:
        raise NotImplementedError("uvicorn runs the loop itself")

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)


class BalancedLoop(uvloop.Loop):
    """uvloop's loop, whose create_server(sock=...) balances connections between the workers
    when `serve` runs several (Settings.connections_dir set); as uvloop's otherwise."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        **options: Any,
    ) -> asyncio.AbstractServer:
        folder = load_settings().connections_dir
        if sock is None or folder is None or options.get("ssl") is not None:
            return await super().create_server(
                protocol_factory, host, port, sock=sock, backlog=backlog, **options
            )
        listener = BalancedListener(self, sock, protocol_factory, ConnectionTally(folder))
        listener.start(backlog)
        return listener
