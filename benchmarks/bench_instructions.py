"""How many instructions does the server run per event? Counted by valgrind's callgrind.

On this class of machine the speed wanders by ±20% from one minute to the next, so timed rounds
over HTTP cannot tell a change of a few percent to the server. An instruction count can:
callgrind gives the same count for the same code and load however busy the machine is (a second
run agreed to 0.01%). The server runs as one worker under callgrind; after a warm-up its
counters are zeroed, the events are posted and committed (waited for by counting rows, so the
server does no extra work meanwhile), and the count is dumped. Only the server process is
counted: not PostgreSQL, not the load generator, not the kernel's side of the sockets.

Run as `python -m benchmarks.bench_instructions [--batch N] [--events N] [--durable]
[--against REF] [--keep DIR]`: with --against, a git worktree of REF is measured first, then this
checkout, each on a new database migrated by its own code; --durable posts with `?wait=true`;
--keep copies each callgrind dump into DIR (callgrind.REF.out, callgrind.this_checkout.out), for
`callgrind_annotate`. Needs valgrind (Debian's package `valgrind`). Prints one JSON line per
checkout and writes benchmarks/results/instructions.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_ingest import ingest_path, post_all, request_bodies
from benchmarks.common import (
    PROJECT_DIR,
    RESULTS_DIR,
    ServerProcess,
    checkout,
    database_migrated_by,
    dumps,
    postgres_server,
    realistic_events,
    run_async,
    wait_stored,
)

# Under callgrind the server starts and runs about 50 times slower than natively.
READY_TIMEOUT_S = 600
_SUMMARY = re.compile(rb"^summary: (\d+)$", re.MULTILINE)
# What a git ref may hold that a file name should not (a slash, say).
_UNSAFE_IN_NAME = re.compile(r"[^\w.-]")


def callgrind_control(option: str, server: ServerProcess) -> None:
    subprocess.run(
        ["callgrind_control", option, str(server.process.pid)], check=True, capture_output=True
    )


@dataclass(frozen=True)
class Load:
    """What is posted: `events` events in requests of batch_size over `connections`."""

    batch_size: int
    connections: int
    events: int
    durable: bool = False

    @property
    def path(self) -> bytes:
        return ingest_path(self.batch_size, "?wait=true" if self.durable else "")


async def count_instructions(dsn: str, tree: Path, load: Load, keep: Path | None) -> int:
    """The instructions the server at `tree` ran to take and commit the load's events; the dump
    is copied to the path `keep` when given."""
    warm_up = [dumps(event) for event in realistic_events(max(2_000, 2 * load.batch_size))]
    measured = [dumps(event) for event in realistic_events(load.events)]
    with tempfile.TemporaryDirectory(prefix="xray-callgrind-") as folder:
        out = Path(folder) / "callgrind.out"
        server = ServerProcess(
            dsn,
            cwd=tree,
            wrapper=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
            XRAY_WORKERS="1",
        )
        try:
            await server.wait_ready(READY_TIMEOUT_S)
            warm_up_bodies = request_bodies(warm_up, load.batch_size)
            await post_all(server, warm_up_bodies, load.path, load.connections)
            await wait_stored(dsn, len(warm_up))
            callgrind_control("--zero", server)
            bodies = request_bodies(measured, load.batch_size)
            await post_all(server, bodies, load.path, load.connections)
            await wait_stored(dsn, len(warm_up) + load.events)
            callgrind_control("--dump", server)
        finally:
            server.stop()
        # The dump holds what ran since the zeroing; the file written at exit, what came after.
        dumped = [name for name in Path(folder).iterdir() if name.name != out.name]
        if len(dumped) != 1:
            raise RuntimeError(f"expected one callgrind dump, found {dumped}")
        if keep is not None:
            shutil.copy(dumped[0], keep)
        summary = _SUMMARY.search(dumped[0].read_bytes())
        if summary is None:
            raise RuntimeError(f"no summary line in {dumped[0]}")
        return int(summary[1])


def commit_of(tree: Path) -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


async def run(load: Load, against: str | None, keep: Path | None) -> list[Any]:
    results: list[dict[str, Any]] = []
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    with postgres_server() as server_dsn, contextlib.ExitStack() as trees:
        checkouts = [trees.enter_context(checkout(against))] if against else []
        checkouts.append(PROJECT_DIR)
        for tree in checkouts:
            label = "this checkout" if tree == PROJECT_DIR or against is None else against
            dump = None
            if keep is not None:
                dump = keep / f"callgrind.{_UNSAFE_IN_NAME.sub('_', label)}.out"
            async with database_migrated_by(server_dsn, tree) as dsn:
                total = await count_instructions(dsn, tree, load, dump)
            result = {
                "checkout": label,
                "commit": commit_of(tree),
                **asdict(load),
                "instructions": total,
                "instructions_per_event": round(total / load.events),
            }
            if results:
                first = results[0]["instructions_per_event"]
                result["ratio_to_first"] = round(result["instructions_per_event"] / first, 4)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1000, help="events per request (1: single)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--events", type=int, default=20_000, help="events counted")
    parser.add_argument("--durable", action="store_true", help="post with ?wait=true")
    parser.add_argument("--against", help="a git ref measured first, for comparison")
    parser.add_argument("--keep", type=Path, help="a folder to copy the callgrind dumps into")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench_instructions needs valgrind: apt-get install valgrind")
    load = Load(args.batch, args.connections, args.events, args.durable)
    results = run_async(run(load, args.against, args.keep))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "instructions.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
