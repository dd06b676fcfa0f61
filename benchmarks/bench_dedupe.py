"""What does skipping already-stored events cost? db.copy_events on 5,000-row batches:

- new: every row new, so the plain COPY path (what nearly every batch takes);
- staged: the same new rows forced through the staging table + INSERT ... ON CONFLICT DO NOTHING
  (what the server would pay if it always deduplicated up front);
- one repeat: each batch carries one already-stored row, so its COPY fails and is redone staged.

Run as `python -m benchmarks.bench_dedupe`; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable

from benchmarks.common import dumps, fresh_database, postgres_server, realistic_events, run_async
from xray_ingest import db
from xray_ingest.models import Row, decode_row

BATCH = 5_000


async def timed(rows: list[Row], store: Callable[[list[Row]], Awaitable[object]]) -> float:
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        await store(rows[start : start + BATCH])
    return len(rows) / (time.perf_counter() - started)


async def measure(events: int) -> dict[str, float]:
    rows = [decode_row(dumps(event)) for event in realistic_events(events)]
    repeated = rows[: len(rows) // BATCH]  # one per batch, stored beforehand
    with postgres_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            pool = await db.create_pool(dsn, max_size=1)

            async def reset(keep: list[Row]) -> None:
                async with pool.acquire() as connection:
                    await connection.execute("TRUNCATE events, traces")
                    await connection.execute("CHECKPOINT")
                if keep:
                    await db.copy_events(pool, keep)

            async def staged(batch: list[Row]) -> int:
                return await db.copy_events(pool, batch, skip_stored=True)

            async def with_one_repeat(batch: list[Row]) -> int:
                return await db.copy_events(pool, [repeated[len(batch) % len(repeated)], *batch])

            # The first COPY into a new database runs far slower than the next, which would
            # flatter the paths measured after "new": a throwaway pass goes first.
            await timed(rows, lambda batch: db.copy_events(pool, batch))
            results: dict[str, float] = {}
            for name, store in (
                ("new", lambda batch: db.copy_events(pool, batch)),
                ("staged", staged),
                ("one_repeat", with_one_repeat),
            ):
                await reset(repeated if name == "one_repeat" else [])
                fresh = rows[len(repeated) :] if name == "one_repeat" else rows
                results[f"{name}_rows_per_s"] = round(await timed(fresh, store))
            await pool.close()
    new = results["new_rows_per_s"]
    results["staged_vs_new"] = round(results["staged_rows_per_s"] / new, 3)
    results["one_repeat_vs_new"] = round(results["one_repeat_rows_per_s"] / new, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    result = run_async(measure(args.events))
    print(json.dumps({"events": args.events, "batch": BATCH, **result}))


if __name__ == "__main__":
    main()
