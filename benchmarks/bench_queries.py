"""How fast do the query endpoints answer on a realistic table: 2M events in 200k traces?

Run as `python -m benchmarks.bench_queries` (`make bench-queries`). Seeds the events with COPY
(a database named xray_bench_queries on XRAY_BENCH_DSN / DATABASE_URL is kept and reused; the
embedded throwaway PostgreSQL is seeded each run), then times each endpoint over HTTP against a
server process and prints a table of p50/p99 latencies, and what each index costs ingest.
Writes benchmarks/results/queries.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from benchmarks.common import (
    RESULTS_DIR,
    HttpClient,
    ServerProcess,
    dumps,
    percentile,
    postgres_server,
    run_async,
    with_database,
)
from xray_ingest import db
from xray_ingest.migrate import migrate
from xray_ingest.models import Row, decode_row

DATABASE = "xray_bench_queries"
SERVICES = [f"pipeline-{n}" for n in range(10)]
DOMAINS = ["retail", "travel", "finance", "health", "media"]
REGIONS = ["eu", "us", "apac", "latam"]
REASONS = ["price", "rating", "stock", "relevance", "brand", "shipping"]
DAYS = 30
COPY_BATCH = 5_000


def trace_events(trace_id: str, start: datetime, rng: random.Random) -> list[dict[str, Any]]:
    """One pipeline run of ten events: llm calls, a funnel of decisions, http requests."""
    service = rng.choice(SERVICES)
    metadata = {
        "domain": rng.choice(DOMAINS),
        "region": rng.choice(REGIONS),
        "user_id": f"u-{rng.randrange(1000)}",
    }
    root = str(uuid.uuid4())
    events: list[dict[str, Any]] = []
    candidates = rng.randint(100, 1000)
    for step in range(10):
        event: dict[str, Any] = {
            "trace_id": trace_id,
            "span_id": root if step == 0 else str(uuid.uuid4()),
            "parent_span_id": None if step == 0 else root,
            "timestamp": (start + timedelta(milliseconds=300 * step)).isoformat(),
            "service": service,
            "duration_ms": rng.randint(5, 900),
            "metadata": metadata,
        }
        kind = step % 3
        if kind == 1:
            kept = int(candidates * rng.choice([0.05, 0.3, 0.5, 0.8, 0.95]))
            dropped = candidates - kept
            first = dropped // 2
            event |= {
                "event_type": "decision",
                "decision": {
                    "input_count": candidates,
                    "output_count": kept,
                    "kept": [{"count": kept, "reason": "matches"}],
                    "dropped": [
                        {"count": first, "reason": rng.choice(REASONS)},
                        {"count": dropped - first, "reason": rng.choice(REASONS)},
                    ],
                },
            }
            candidates = max(kept, 1)
        elif kind == 2 and rng.random() < 0.5:
            event |= {
                "event_type": "http_request",
                "request": {"method": "GET", "url": "https://api.example/search"},
                "response": {"status": 200},
            }
            if rng.random() < 0.1:
                event["error"] = {"message": "upstream timeout", "code": "ETIMEDOUT"}
        else:
            event |= {
                "event_type": "llm_call",
                "model": {"provider": "openai", "name": "gpt-4o"},
                "input": {"input_tokens": rng.randint(100, 2000), "raw_prompt": "rank these"},
                "output": {"output_tokens": rng.randint(10, 500)},
            }
        events.append(event)
    return events


async def seed(dsn: str, traces: int, now: datetime) -> None:
    rng = random.Random(42)
    pool = await db.create_pool(dsn, max_size=2)
    queue: asyncio.Queue[list[Row] | None] = asyncio.Queue(maxsize=4)

    async def copier() -> None:
        while (rows := await queue.get()) is not None:
            await db.copy_events(pool, rows)

    copiers = [asyncio.create_task(copier()) for _ in range(2)]
    started = time.perf_counter()
    rows: list[Row] = []
    for n in range(traces):
        start = now - timedelta(seconds=rng.uniform(0, DAYS * 86_400))
        rows += [decode_row(dumps(e)) for e in trace_events(str(uuid.uuid4()), start, rng)]
        if len(rows) >= COPY_BATCH:
            await queue.put(rows)
            rows = []
        if n % 20_000 == 0:
            print(f"  seeded {n:,} traces ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    await queue.put(rows)
    for _ in copiers:
        await queue.put(None)
    await asyncio.gather(*copiers)
    await pool.close()
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()


async def prepare(
    server_dsn: str, traces: int, reseed: bool, database: str
) -> tuple[str, datetime]:
    """The seeded database's DSN and the 'now' its times were made around."""
    admin = await asyncpg.connect(server_dsn)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists and reseed:
            await admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
        if not exists or reseed:
            await admin.execute(f"CREATE DATABASE {database}")
    finally:
        await admin.close()
    dsn = with_database(server_dsn, database)
    await migrate(dsn)
    connection = await asyncpg.connect(dsn)
    try:
        have = await connection.fetchval("SELECT count(*) FROM traces")
        newest = await connection.fetchval("SELECT max(start_time) FROM traces")
    finally:
        await connection.close()
    if have >= traces:
        print(f"reusing {database}: {have:,} traces", file=sys.stderr)
        return dsn, newest
    now = datetime.now(UTC)
    print(f"seeding {traces:,} traces ({traces * 10:,} events) ...", file=sys.stderr)
    await seed(dsn, traces - have, now)
    return dsn, now


async def sample_ids(dsn: str, count: int) -> list[uuid.UUID]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT trace_id FROM traces ORDER BY random() LIMIT $1", count
        )
    finally:
        await connection.close()
    return [row["trace_id"] for row in rows]


async def time_requests(port: int, paths: list[str]) -> tuple[float, float]:
    client = await HttpClient.connect(port)
    latencies = []
    try:
        for path in paths:
            started = time.perf_counter()
            status, body = await client.request(b"GET", path.encode())
            latencies.append(time.perf_counter() - started)
            if status != 200 and not (status == 404 and "funnel" in path):
                raise RuntimeError(f"{path}: {status} {body[:200]!r}")
    finally:
        client.close()
    latencies.sort()
    return percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000


def endpoints(ids: list[uuid.UUID], now: datetime, repeat: int) -> dict[str, list[str]]:
    day_ago = (now - timedelta(hours=24)).isoformat().replace("+00:00", "Z")
    by_id = ids[:repeat]
    fixed = {
        "traces, first page": "/v1/traces",
        "traces?service=": f"/v1/traces?service={SERVICES[3]}",
        "traces?event_type=http_request": "/v1/traces?event_type=http_request",
        "traces?has_error=true": "/v1/traces?has_error=true",
        "traces?metadata.domain=": "/v1/traces?metadata.domain=retail",
        "traces?metadata.user_id= (rare)": "/v1/traces?metadata.user_id=u-17",
        "traces?min_duration_ms=3000": "/v1/traces?min_duration_ms=3000",
        "traces?since=24h ago": f"/v1/traces?since={day_ago}",
        "high-drop-traces, last 24h": (
            f"/v1/analytics/high-drop-traces?threshold=0.9&since={day_ago}"
        ),
        "high-drop-traces, all time": "/v1/analytics/high-drop-traces?threshold=0.9",
        "drop-reasons, last 24h": f"/v1/analytics/drop-reasons?since={day_ago}",
        "metadata-values?field=domain": "/v1/analytics/metadata-values?field=domain",
    }
    table = {
        "trace by id": [f"/v1/traces/{t}" for t in by_id],
        "events by trace_id": [f"/v1/events?trace_id={t}" for t in by_id],
        "funnel-stats": [f"/v1/analytics/funnel-stats?trace_id={t}" for t in by_id],
    }
    few = max(5, repeat // 10)
    for name, path in fixed.items():
        table[name] = [path] * (few if "metadata-values" in name or "all time" in name else repeat)
    return table


async def index_costs(server_dsn: str, events: int) -> dict[str, float]:
    """COPY throughput into a fresh events table with all indexes, then without each one."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    rows: list[Row] = []
    while len(rows) < events:
        start = now - timedelta(seconds=rng.uniform(0, 86_400))
        rows += [decode_row(dumps(e)) for e in trace_events(str(uuid.uuid4()), start, rng)]
    optional = [
        "events_span_id_idx",
        "events_decision_time_idx",
        "events_decision_drop_rate_idx",
        "events_metadata_idx",
    ]
    results: dict[str, float] = {}
    for dropped in [None, *optional, "all four"]:
        name = f"xray_bench_idx_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(server_dsn)
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            dsn = with_database(server_dsn, name)
            await migrate(dsn)
            connection = await asyncpg.connect(dsn)
            for index in optional if dropped == "all four" else [dropped] if dropped else []:
                await connection.execute(f"DROP INDEX {index}")
            await connection.close()
            pool = await db.create_pool(dsn, max_size=1)
            started = time.perf_counter()
            for offset in range(0, len(rows), COPY_BATCH):
                await db.copy_events(pool, rows[offset : offset + COPY_BATCH])
            results[f"without {dropped}" if dropped else "all indexes"] = round(
                len(rows) / (time.perf_counter() - started)
            )
            await pool.close()
        finally:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            await admin.close()
        print(f"  COPY rows/s {results}", file=sys.stderr)
    return results


async def run(
    traces: int, repeat: int, reseed: bool, index_events: int, database: str
) -> dict[str, Any]:
    with postgres_server() as server_dsn:
        dsn, now = await prepare(server_dsn, traces, reseed, database)
        ids = await sample_ids(dsn, repeat)
        server = ServerProcess(dsn)
        try:
            await server.wait_ready()
            timings: dict[str, tuple[float, float]] = {}
            for name, paths in endpoints(ids, now, repeat).items():
                await time_requests(server.port, paths[:2])  # warm the prepared statements
                timings[name] = await time_requests(server.port, paths)
                p50, p99 = timings[name]
                print(f"  {name:<36} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms", file=sys.stderr)
        finally:
            server.stop()
        costs = await index_costs(server_dsn, index_events) if index_events else {}
    print(f"\n{'endpoint':<36}{'p50 ms':>10}{'p99 ms':>10}")
    for name, (p50, p99) in timings.items():
        print(f"{name:<36}{p50:>10.2f}{p99:>10.2f}")
    if costs:
        base = costs["all indexes"]
        print(f"\n{'COPY into events':<44}{'rows/s':>10}{'x all indexes':>15}")
        for name, value in costs.items():
            print(f"{name:<44}{value:>10,.0f}{value / base:>15.2f}")
    return {
        "traces": traces,
        "events": traces * 10,
        "latency_ms": {
            k: {"p50": round(a, 2), "p99": round(b, 2)} for k, (a, b) in timings.items()
        },
        "copy_rows_per_s_by_index": costs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=200, help="requests per endpoint")
    parser.add_argument("--reseed", action="store_true", help="drop and seed again")
    parser.add_argument("--index-events", type=int, default=100_000, help="0 to skip")
    parser.add_argument("--database", default=DATABASE, help="kept between runs")
    parser.add_argument("--output", default="queries.json", help="in benchmarks/results/")
    args = parser.parse_args()
    report = run_async(run(args.traces, args.repeat, args.reseed, args.index_events, args.database))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
