"""Does ingest hold up as the table grows? Committed events/s at 0, 1M and 5M stored rows.

Run as `python -m benchmarks.bench_growth` (takes several minutes: it fills the table with raw
COPY between measurements). At each size it drives a fresh server with 100-event batches over 8
connections, as `bench_ingest` does, --rounds times (each round adds its events to the table), and
prints one JSON line per size: the median rate and each round's, the drop against the empty
table, and what PostgreSQL did meanwhile (WAL and full-page images per event, checkpoints,
autovacuum runs on events, buffer reads that missed shared_buffers, index sizes).

The fill writes millions of rows in a minute or two, far faster than the server ever would, so
autovacuum and checkpoints it triggers would still be running during the measurement. With
--settle (the default) each fill ends with VACUUM and CHECKPOINT, so the figure is the table's
steady state at that size; --no-settle measures in the fill's wake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import asyncpg

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


async def fill(dsn: str, have: int, target: int, settle: bool) -> int:
    """Adds realistic events with raw COPY to a table of `have` rows until it holds `target`;
    returns how many it holds."""
    pool = await db.create_pool(dsn, max_size=2)
    try:
        while have < target:
            rows = [decode_row(dumps(e)) for e in realistic_events(min(FILL_CHUNK, target - have))]
            half = len(rows) // 2
            await asyncio.gather(
                db.copy_events(pool, rows[:half]), db.copy_events(pool, rows[half:])
            )
            have += len(rows)
            print(f"  filled {have:,} rows", file=sys.stderr)
        if settle:
            async with pool.acquire() as connection:
                await connection.execute("VACUUM (ANALYZE) events")
                await connection.execute("CHECKPOINT")
    finally:
        await pool.close()
    return have


async def postgres_activity(dsn: str) -> dict[str, float]:
    """Cumulative counters of the work PostgreSQL does for inserts into events."""
    connection = await asyncpg.connect(dsn)
    try:
        if await connection.fetchval("SELECT to_regclass('pg_stat_checkpointer') IS NOT NULL"):
            checkpoints = "SELECT num_timed + num_requested FROM pg_stat_checkpointer"  # 17+
        else:
            checkpoints = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        row = await connection.fetchrow(
            f"""
            SELECT
                wal.wal_bytes,
                wal.wal_fpi,
                ({checkpoints}) AS checkpoints,
                tables.autovacuum_count AS autovacuums,
                tables.autoanalyze_count AS autoanalyzes,
                coalesce(io.index_reads, 0) AS index_reads,
                coalesce(io.index_hits, 0) AS index_hits
            FROM pg_stat_wal AS wal
            CROSS JOIN pg_stat_user_tables AS tables
            CROSS JOIN (
                SELECT sum(idx_blks_read) AS index_reads, sum(idx_blks_hit) AS index_hits
                FROM pg_statio_user_indexes WHERE relid = 'events'::regclass
            ) AS io
            WHERE tables.relid = 'events'::regclass
            """
        )
        assert row is not None
        return {name: float(value) for name, value in row.items()}
    finally:
        await connection.close()


async def index_sizes_mib(dsn: str) -> dict[str, float]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            """
            SELECT indexrelid::regclass::text AS name, pg_relation_size(indexrelid) AS size
            FROM pg_index WHERE indrelid = 'events'::regclass ORDER BY name
            """
        )
        return {row["name"]: round(row["size"] / 2**20, 1) for row in rows}
    finally:
        await connection.close()


async def measure(dsn: str, size: int, events: int) -> dict[str, Any]:
    encoded = [dumps(e) for e in realistic_events(events)]
    before = await postgres_activity(dsn)
    result = await drive(dsn, encoded, 100, 8, keep_rows=True)
    after = await postgres_activity(dsn)
    # What a count(*) takes at this size: the bench once had one in the timed span.
    counted = time.perf_counter()
    await count_events(dsn)
    count_seconds = time.perf_counter() - counted
    done = {name: after[name] - before[name] for name in after}
    index_blocks = done["index_reads"] + done["index_hits"]
    return {
        "stored_rows": size,
        "committed_events_per_s": result.committed_events_per_s,
        "wal_bytes_per_event": round(done["wal_bytes"] / events),
        "full_page_images_per_event": round(done["wal_fpi"] / events, 3),
        "checkpoints": int(done["checkpoints"]),
        "autovacuums_of_events": int(done["autovacuums"]),
        "autoanalyzes_of_events": int(done["autoanalyzes"]),
        "index_block_miss_ratio": round(
            done["index_reads"] / index_blocks if index_blocks else 0.0, 4
        ),
        "index_mib_after": await index_sizes_mib(dsn),
        "count_star_seconds": round(count_seconds, 2),
    }


def combine(size: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's rounds as one line: medians of the rates and of the per-event figures, the sums
    of the counts, and the index sizes after the last round."""
    line = dict(rounds[-1], stored_rows=size, rounds=len(rounds))
    for name in (
        "committed_events_per_s",
        "wal_bytes_per_event",
        "full_page_images_per_event",
        "index_block_miss_ratio",
    ):
        line[name] = statistics.median(r[name] for r in rounds)
    for name in ("checkpoints", "autovacuums_of_events", "autoanalyzes_of_events"):
        line[name] = sum(r[name] for r in rounds)
    line["committed_by_round"] = [r["committed_events_per_s"] for r in rounds]
    line["stored_rows_by_round"] = [r["stored_rows"] for r in rounds]
    return line


async def run(sizes: list[int], events: int, settle: bool, rounds: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with postgres_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            # The database is new, and drive() checks that every event measured was stored.
            stored = 0
            for size in sizes:
                stored = await fill(dsn, stored, size, settle)
                measured = []
                for _ in range(rounds):
                    measured.append(await measure(dsn, stored, events))
                    stored += events
                line = combine(size, measured)
                if results:
                    first = results[0]["committed_events_per_s"]
                    line["vs_empty"] = round(line["committed_events_per_s"] / first, 3)
                results.append(line)
                print(json.dumps(line), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="0,1000000,5000000")
    parser.add_argument("--events", type=int, default=200_000, help="measured at each size")
    parser.add_argument("--settle", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rounds", type=int, default=3, help="measurements at each size")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    run_async(run(sizes, args.events, args.settle, args.rounds))


if __name__ == "__main__":
    main()
