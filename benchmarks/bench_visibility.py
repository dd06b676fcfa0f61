"""How soon after its 202 can an event be read back, while the server carries half its load?

Run as `python -m benchmarks.bench_visibility`. Background clients post 100-event batches at a
fixed rate (default 36,000 events/s, about half the committed peak `bench_ingest` measures on a
2-core machine); a probe posts one event of a new trace every 50 ms and polls
`GET /v1/events?trace_id=` every 2 ms until the event is there. Prints one JSON line with the
visibility latency p50/p99 (from the 202 to the first read that returns it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

from benchmarks.common import (
    HttpClient,
    ServerProcess,
    dumps,
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


async def measure(rate: float, seconds: float) -> dict[str, float]:
    events = realistic_events(int(rate * seconds * 1.2))
    encoded = [dumps(e) for e in events]
    bodies = [
        b'{"events":[' + b",".join(encoded[i : i + BATCH]) + b"]}"
        for i in range(0, len(encoded), BATCH)
    ]
    with postgres_server() as server_dsn:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # About half the committed peak of batches of 100 in bench_ingest (72k/s in the last run).
    parser.add_argument("--rate", type=float, default=36_000, help="background events/s")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    result = run_async(measure(args.rate, args.seconds))
    print(json.dumps({"rate": args.rate, "seconds": args.seconds, **result}))


if __name__ == "__main__":
    main()
