"""Helpers for tests that run the server as a real process and talk HTTP to it."""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.common import free_port, peak_rss_mib, process_tree
from tests import samples
from tests.samples import dumps
from xray_ingest.config import default_workers

PROJECT_DIR = Path(__file__).resolve().parent.parent

ENV_TO_DROP = ("DATABASE_URL", "XRAY_TEST_DSN", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE")


def request(
    port: int,
    path: str,
    body: bytes | None = None,
    timeout_s: float = 10,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def request_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        text: str = response.read().decode()
        return text


class Server:
    """`python -m xray_ingest serve` on a free port, in its own process group, logging to a
    file (a pipe could fill up and block it)."""

    # Every server started, so that a failed test's server is still killed (conftest).
    started: ClassVar[list[Server]] = []

    def __init__(self, env: dict[str, str], cwd: Path = PROJECT_DIR) -> None:
        Server.started.append(self)
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in output())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xray_ingest", "serve", "--port", str(self.port)],
            env=env,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers = self.workers = int(env.get("XRAY_WORKERS") or default_workers())
        deadline = time.monotonic() + 60
        # Up when every worker has started (each logs it), not only the first to answer, and
        # the port answers (one worker logs its start before it listens).
        while not (
            self.log_text().count("Application startup complete") >= workers and self._healthy()
        ):
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return request(self.port, "/health", timeout_s=1)[0] == 200
        except OSError:
            return False

    def log_text(self) -> str:
        """The log so far. pread leaves the file offset alone: the server writes at it."""
        fd = self.log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, group: bool = False) -> str:
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        output = self.output(timeout_s=60)
        assert self.process.returncode == 0, output
        return output

    def kill(self) -> None:
        """SIGKILL to the server and its workers (its process group): killing the supervisor
        alone leaves the workers serving."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def client_ports_by_worker(self) -> dict[int, set[int]]:
        """For each process of the server, the client ports of the connections whose sockets
        it still holds, closed by the client or not (from /proc: the sockets among its
        descriptors, matched to /proc/net/tcp)."""
        client_port_of_inode = {}
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == self.port and fields[3] != "0A":  # not the listening socket
                client_port_of_inode[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
        held: dict[int, set[int]] = {}
        for pid in process_tree(self.process.pid):
            held[pid] = set()
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        inode = os.readlink(fd).removeprefix("socket:[").removesuffix("]")
                        if inode in client_port_of_inode:
                            held[pid].add(client_port_of_inode[inode])
        return held

    def connection_to_each_worker(self) -> list[http.client.HTTPConnection]:
        """Keep-alive connections, one held by each worker: opened one at a time until every
        worker holds one (the workers share connections evenly, so two usually do), the spare
        ones kept open meanwhile, so that they count, then closed."""
        kept: dict[int, http.client.HTTPConnection] = {}
        spare: list[http.client.HTTPConnection] = []
        while len(kept) < self.workers and len(spare) < 20:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            connection.request("GET", "/health")  # accepted and answered by then
            assert connection.getresponse().read()
            port = connection.sock.getsockname()[1]
            holders = self.client_ports_by_worker().items()
            pid = next(pid for pid, ports in holders if port in ports)
            if pid in kept:
                spare.append(connection)
            else:
                kept[pid] = connection
        for connection in spare:
            connection.close()
        assert len(kept) == self.workers, f"{len(spare)} connections went to the same workers"
        return list(kept.values())

    def peak_rss_mib(self) -> float:
        """Peak resident memory (VmHWM), summed over the server and its workers."""
        return sum(peak_rss_mib(pid) for pid in process_tree(self.process.pid))

    def output(self, timeout_s: float = 0) -> str:
        """Waits up to timeout_s for the process to exit (then kills it) and returns its log."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
        if self.log.closed:
            return ""
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        self.log.close()
        return text


class Loader:
    """Threads that post batches of `size` events until stopped, recording which span_ids
    were acknowledged (202, or 201 when durable) and every other answer."""

    def __init__(self, port: int, threads: int = 4, size: int = 20, durable: bool = False):
        self.port = port
        self.size = size
        self.path = "/v1/events/batch" + ("?wait=true" if durable else "")
        self.acked: list[str] = []
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            events = [samples.custom() for _ in range(self.size)]
            try:
                status, body = request(self.port, self.path, dumps(events), timeout_s=30)
            except OSError as error:  # refused or reset: the server is going away
                self.statuses[type(error).__name__] += 1
                time.sleep(0.01)
                continue
            self.statuses[status] += 1
            if status in (201, 202):
                self.acked += body["ids"]
            elif status == 503:
                time.sleep(0.01)

    def stop(self) -> set[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return set(self.acked)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_TO_DROP}
    env.update(extra)
    return env


def post_batch_on(connection: http.client.HTTPConnection, trace_id: str, size: int) -> set[str]:
    """One batch of `size` custom events on a kept-alive connection; the ids answered."""
    events = [samples.custom(trace_id=trace_id) for _ in range(size)]
    connection.request("POST", "/v1/events/batch", dumps(events))
    answer = connection.getresponse()
    body = json.loads(answer.read())
    assert answer.status == 202, body
    return set(body["ids"])


def post_batches(port: int, trace_id: str, batches: int, size: int) -> set[str]:
    sent: set[str] = set()
    for _ in range(batches):
        events = [samples.custom(trace_id=trace_id) for _ in range(size)]
        status, body = request(port, "/v1/events/batch", dumps(events))
        assert status == 202, body
        sent |= set(body["ids"])
    return sent
