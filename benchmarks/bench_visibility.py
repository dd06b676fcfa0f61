"""How soon after its 202 can an event be read back, while the server carries half its load?

Run as `python -m benchmarks.bench_visibility`. Background clients post 100-event batches at a
fixed rate: by default half the highest committed events/s of the last `bench_ingest` run (its
benchmarks/results/ingest.json; `make bench` runs it just before), else 36,000 events/s. A
probe posts one event of a new trace every 50 ms and polls
`GET /v1/events?trace_id=` every 2 ms until the event is there. Prints one JSON line with the
visibility latency p50/p99 (from the 202 to the first read that returns it).

It measures twice on one PostgreSQL. The first pass starts with no WAL written, as a new data
folder does: each commit may wait while PostgreSQL creates and zero-fills a new 16 MB WAL segment
(pg_stat_activity showed COMMIT waiting on WALInitWrite and WALInitSync). A CHECKPOINT then lets
PostgreSQL recycle the first pass's segments, as on any server that has run past its first
checkpoint, and the second pass, the steady state, gives the top-level figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    HttpClient,
    ServerProcess,
    dumps,
    execute,
    fresh_database,
    percentile,
    postgres_server,
    realistic_events,
    run_async,
)

BATCH = 100


async def background_load(port: int, rate: float, until: float, bodies: list[bytes]) -> int:
    """Posts batches at `rate` events/s over 4 connections; returns the events acknowledged."""
    interval = BATCH / rate * 4
    acked = 0

    async def sender(offset: int) -> None:
        nonlocal acked
        client = await HttpClient.connect(port)
        next_at = time.monotonic()
        index = offset
        try:
            while time.monotonic() < until and index < len(bodies):
                status, _ = await client.request(b"POST", b"/v1/events/batch", bodies[index])
                acked += BATCH if status == 202 else 0
                index += 4
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            client.close()

    await asyncio.gather(*(sender(n) for n in range(4)))
    return acked


async def probe(port: int, until: float) -> list[float]:
    poster = await HttpClient.connect(port)
    reader = await HttpClient.connect(port)
    latencies: list[float] = []
    try:
        while time.monotonic() < until:
            trace_id = str(uuid.uuid4())
            event = {
                "event_type": "probe",
                "trace_id": trace_id,
                "timestamp": datetime.now(UTC).isoformat(),
            }
            status, _ = await poster.request(b"POST", b"/v1/events", dumps(event))
            acked_at = time.perf_counter()
            assert status == 202, status
            path = f"/v1/events?trace_id={trace_id}".encode()
            while True:
                _, body = await reader.request(b"GET", path)
                if b'"count":1' in body:
                    latencies.append(time.perf_counter() - acked_at)
                    break
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.05)
    finally:
        poster.close()
        reader.close()
    return latencies


async def measure_pass(
    server_dsn: str, rate: float, seconds: float, bodies: list[bytes]
) -> dict[str, float]:
    """One run of the background load and the probe, on a new database and a new server."""
    async with fresh_database(server_dsn) as dsn:
        server = ServerProcess(dsn)
        try:
            await server.wait_ready()
            until = time.monotonic() + seconds
            acked, latencies = await asyncio.gather(
                background_load(server.port, rate, until, bodies), probe(server.port, until)
            )
        finally:
            server.stop()
    latencies.sort()
    return {
        "background_events_per_s": round(acked / seconds),
        "probes": len(latencies),
        "visibility_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "visibility_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "visibility_max_ms": round(latencies[-1] * 1000, 2) if latencies else float("nan"),
    }


async def measure(rate: float, seconds: float) -> dict[str, Any]:
    """The steady state's figures, with the first pass's under "before_checkpoint"."""
    events = realistic_events(int(rate * seconds * 1.2))
    encoded = [dumps(e) for e in events]
    bodies = [
        b'{"events":[' + b",".join(encoded[i : i + BATCH]) + b"]}"
        for i in range(0, len(encoded), BATCH)
    ]
    with postgres_server() as server_dsn:
        before_checkpoint = await measure_pass(server_dsn, rate, seconds, bodies)
        await execute(server_dsn, "CHECKPOINT")
        steady = await measure_pass(server_dsn, rate, seconds, bodies)
    return {**steady, "before_checkpoint": before_checkpoint}


def half_the_peak() -> tuple[float, str]:
    """Half the highest committed events/s in the last bench_ingest results, and where the rate
    came from. Without them, 36,000: about half the peak on a 2-core machine."""
    try:
        report = json.loads((RESULTS_DIR / "ingest.json").read_text())
    except FileNotFoundError:
        return 36_000, "default"
    peak = max(r["committed_events_per_s"] for r in report["results"])
    return round(peak / 2), "half the peak in benchmarks/results/ingest.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, help="background events/s")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    rate, source = (args.rate, "--rate") if args.rate else half_the_peak()
    result = run_async(measure(rate, args.seconds))
    print(json.dumps({"rate": rate, "rate_from": source, "seconds": args.seconds, **result}))


if __name__ == "__main__":
    main()
