"""Does ingest hold up as the table grows? Committed events/s at 0, 1M and 5M stored rows.

Run as `python -m benchmarks.bench_growth` (takes several minutes: it fills the table with raw
COPY between measurements). At each size it drives a fresh server with 100-event batches over 8
connections, as `bench_ingest` does, and prints one JSON line per size with the drop against
the empty table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from benchmarks.bench_ingest import drive
from benchmarks.common import (
    count_events,
    dumps,
    fresh_database,
    postgres_server,
    realistic_events,
    run_async,
)
from xray_ingest import db
from xray_ingest.models import decode_row

FILL_CHUNK = 50_000


async def fill(dsn: str, target: int) -> None:
    """Adds realistic events with raw COPY until the table holds `target` rows."""
    pool = await db.create_pool(dsn, max_size=2)
    try:
        while (have := await count_events(dsn)) < target:
            rows = [decode_row(dumps(e)) for e in realistic_events(min(FILL_CHUNK, target - have))]
            half = len(rows) // 2
            await asyncio.gather(
                db.copy_events(pool, rows[:half]), db.copy_events(pool, rows[half:])
            )
            print(f"  filled {have + len(rows):,} rows", file=sys.stderr)
    finally:
        await pool.close()


async def run(sizes: list[int], events: int) -> list[dict[str, float]]:
    results: list[dict[str, float]] = []
    with postgres_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            for size in sizes:
                await fill(dsn, size)
                encoded = [dumps(e) for e in realistic_events(events)]
                result = await drive(dsn, encoded, 100, 8, keep_rows=True)
                line = {
                    "stored_rows": size,
                    "committed_events_per_s": result.committed_events_per_s,
                }
                if results:
                    first = results[0]["committed_events_per_s"]
                    line["vs_empty"] = round(result.committed_events_per_s / first, 3)
                results.append(line)
                print(json.dumps(line), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="0,1000000,5000000")
    parser.add_argument("--events", type=int, default=100_000, help="measured at each size")
    args = parser.parse_args()
    run_async(run([int(n) for n in args.sizes.split(",")], args.events))


if __name__ == "__main__":
    main()
