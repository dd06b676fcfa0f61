"""Connections shared evenly between workers: the counts the workers share, and listeners taking
turns on one listening socket (here two in one process, standing for two workers)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from xray_ingest import balance
from xray_ingest.balance import YIELD_S, BalancedListener, ConnectionTally


def test_a_tally_reads_the_fewest_any_other_live_worker_holds(tmp_path: Path) -> None:
    mine = ConnectionTally(tmp_path)
    assert mine.fewest_elsewhere() is None
    assert not mine.holds_more_than_share()  # alone, every connection is its share
    mine.add(1)
    assert not mine.holds_more_than_share()
    other = ConnectionTally(tmp_path, pid=os.getppid())
    assert mine.fewest_elsewhere() == 0
    assert mine.holds_more_than_share()
    other.add(3)
    assert (mine.fewest_elsewhere(), other.fewest_elsewhere()) == (3, 1)
    mine.add(3)
    assert mine.holds_more_than_share() and not other.holds_more_than_share()
    mine.add(-2)
    assert mine.held == 2 and not mine.holds_more_than_share()
    mine.close()
    assert other.fewest_elsewhere() is None
    assert [path.name for path in tmp_path.iterdir()] == [str(os.getppid())]


def test_a_dead_workers_count_is_ignored_and_its_file_removed(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = ConnectionTally(tmp_path, pid=finished.pid)  # a worker killed before it could close
    mine = ConnectionTally(tmp_path)
    mine.add(5)
    assert mine.fewest_elsewhere() is None
    assert not (tmp_path / str(finished.pid)).exists()
    assert not mine.holds_more_than_share()
    dead.close()


class Connection(asyncio.Protocol):
    """What the listeners' protocol factory makes: reports its loss as HttpProtocol does."""

    tally: ConnectionTally | None = None

    def __init__(self, made: list[Connection]) -> None:
        self.made = made
        self.peer: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = transport.get_extra_info("peername")
        self.made.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.tally is not None
        self.tally.add(-1)


class Workers:
    """Listeners on copies of one listening socket, each with its tally, as each worker has.
    The copies are of listening_type (a socket.socket that fails on purpose, say)."""

    def __init__(
        self, folder: Path, count: int, listening_type: type[socket.socket] = socket.socket
    ) -> None:
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.port = self.listening.getsockname()[1]
        self.made: list[Connection] = []
        loop = asyncio.get_running_loop()
        pids = [os.getpid(), os.getppid()][:count]
        self.listeners = [
            BalancedListener(
                loop,
                listening_type(fileno=self.listening.dup().detach()),
                lambda: Connection(self.made),
                ConnectionTally(folder, pid=pid),
            )
            for pid in pids
        ]
        for listener in self.listeners:
            listener.start(backlog=100)

    def held(self) -> list[int]:
        return [listener.tally.held for listener in self.listeners]

    async def connect(self, count: int) -> list[asyncio.StreamWriter]:
        opened = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", self.port) for _ in range(count))
        )
        return [writer for _, writer in opened]

    async def wait_made(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.made) < count:
                await asyncio.sleep(0.001)

    async def wait_held(self, counts: list[int]) -> None:
        async with asyncio.timeout(5):
            while self.held() != counts:
                await asyncio.sleep(0.001)

    async def close(self) -> None:
        for listener in self.listeners:
            listener.close()
            await listener.wait_closed()
            listener.sockets[0].close()
        self.listening.close()


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[Workers]:
    workers = Workers(tmp_path, 2)
    yield workers
    await workers.close()


@contextlib.asynccontextmanager
async def beside_an_idle_worker(
    folder: Path, listening_type: type[socket.socket] = socket.socket
) -> AsyncIterator[tuple[Workers, ConnectionTally]]:
    """One listener, and the count of another worker that holds nothing and accepts nothing
    (busy, say): the listener's second connection comes after a yield."""
    workers = Workers(folder, 1, listening_type)
    other = ConnectionTally(folder, pid=os.getppid())
    try:
        yield workers, other
    finally:
        other.close()
        await workers.close()


async def test_a_burst_of_connections_is_shared_evenly(two_workers: Workers) -> None:
    writers = await two_workers.connect(8)
    await two_workers.wait_made(8)
    assert two_workers.held() == [4, 4]
    for writer in writers:
        writer.close()
    await two_workers.wait_held([0, 0])


async def test_new_connections_go_to_the_worker_whose_connections_closed(
    two_workers: Workers,
) -> None:
    writers = await two_workers.connect(8)
    await two_workers.wait_made(8)
    first = two_workers.listeners[0].tally
    # Close the first listener's 4: the client ends are found by their server ends' addresses.
    client_ends = {writer.get_extra_info("sockname"): writer for writer in writers}
    for connection in two_workers.made:
        if connection.tally is first:
            client_ends[connection.peer].close()
    await two_workers.wait_held([0, 4])
    more = await two_workers.connect(4)
    await two_workers.wait_made(12)
    assert two_workers.held() == [4, 4]
    for writer in [*writers, *more]:
        writer.close()


async def test_a_connection_no_other_worker_takes_is_taken_after_the_yield(
    tmp_path: Path,
) -> None:
    async with beside_an_idle_worker(tmp_path) as (workers, _):
        writers = await workers.connect(1)
        await workers.wait_made(1)
        started = time.perf_counter()
        writers += await workers.connect(1)
        await workers.wait_made(2)
        assert time.perf_counter() - started >= YIELD_S
        assert workers.held() == [2]
        for writer in writers:
            writer.close()


async def test_a_yielding_worker_takes_the_connection_once_it_holds_no_more_than_its_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Yielding for longer than the test waits: only the other worker's count can end it.
    monkeypatch.setattr(balance, "YIELD_S", 60.0)
    async with beside_an_idle_worker(tmp_path) as (workers, other):
        writers = await workers.connect(1)
        await workers.wait_made(1)
        writers += await workers.connect(1)
        await asyncio.sleep(0.05)
        assert workers.held() == [1], "it holds more than the other worker: it should wait"
        other.add(1)  # the other worker took one elsewhere: this one holds no more than it
        await workers.wait_made(2)
        assert workers.held() == [2]
        for writer in writers:
            writer.close()


class AcceptFailingOnce(socket.socket):
    """A listening socket whose second accept() fails as when the process is out of
    descriptors."""

    calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        AcceptFailingOnce.calls += 1
        if AcceptFailingOnce.calls == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def test_a_failed_accept_after_a_yield_pauses_listening_then_takes_the_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    AcceptFailingOnce.calls = 0
    # The second connection comes after a yield, in _recheck, where the failure must not end
    # listening.
    async with beside_an_idle_worker(tmp_path, AcceptFailingOnce) as (workers, _):
        writers = await workers.connect(1)
        await workers.wait_made(1)
        writers += await workers.connect(1)
        await workers.wait_made(2)
        assert AcceptFailingOnce.calls == 3
        assert "accepting a connection failed: [Errno 24] Too many open files" in caplog.text
        assert workers.held() == [2]
        for writer in writers:
            writer.close()


async def test_a_closed_listener_accepts_nothing_and_removes_its_count(tmp_path: Path) -> None:
    workers = Workers(tmp_path, 1)
    writers = await workers.connect(1)
    await workers.wait_made(1)
    await workers.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        await workers.connect(1)
    # A connection still open when the worker stopped listening (it drains them) closes later:
    # counted, not written anywhere (its descriptor is closed, and its number maybe reused).
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    reused = tmp_path / "reused"
    with reused.open("wb") as other_file:
        writers[0].close()
        await workers.wait_held([0])
        other_file.flush()
    assert reused.read_bytes() == b""
    assert errors == []
