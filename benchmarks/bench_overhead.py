"""What do per-request bookkeeping (metrics, auth check, request id) and access lines cost ingest?

Run as `python -m benchmarks.bench_overhead [--before REF]`. In one run, alternating rounds, it
drives the same events through three one-worker servers with otherwise default settings: the
checkout at REF (by default the last commit before metrics, API keys and access logs), this
checkout with XRAY_ACCESS_LOG=off, and this checkout as it ships. It prints one JSON line per
drive, then a table of medians with each as a ratio of REF's, and writes
benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from benchmarks.bench_ingest import drive
from benchmarks.common import (
    RESULTS_DIR,
    ServerProcess,
    checkout,
    database_migrated_by,
    dumps,
    fresh_database,
    postgres_server,
    realistic_events,
    run_async,
)

# The last commit before metrics, API keys and access logs were added.
BEFORE_OBSERVABILITY = "94e96c5"
SCENARIOS = [(1, 64), (10, 16), (100, 8)]  # (batch size, connections)


async def run(events: int, rounds: int, before: str) -> dict[str, Any]:
    print(f"generating {events:,} events ...", file=sys.stderr)
    encoded = [dumps(event) for event in realistic_events(events)]
    results: list[dict[str, Any]] = []
    with postgres_server() as server_dsn, checkout(before) as tree:
        async with (
            database_migrated_by(server_dsn, tree) as before_dsn,
            fresh_database(server_dsn) as dsn,
        ):
            # One worker each: this measures the bookkeeping, not the worker count.
            variants: dict[str, Callable[[], ServerProcess]] = {
                f"before ({before})": lambda: ServerProcess(before_dsn, cwd=tree, XRAY_WORKERS="1"),
                "now, access log off": lambda: ServerProcess(
                    dsn, XRAY_ACCESS_LOG="off", XRAY_WORKERS="1"
                ),
                "now (defaults)": lambda: ServerProcess(dsn, XRAY_WORKERS="1"),
            }
            for round_number in range(rounds):
                for batch_size, connections in SCENARIOS:
                    for variant, start in variants.items():
                        target = before_dsn if variant.startswith("before") else dsn
                        print(f"round {round_number + 1}: {variant}, batch {batch_size} ...")
                        result = await drive(
                            target, encoded, batch_size, connections, server=start()
                        )
                        line = {"variant": variant, "round": round_number + 1, **asdict(result)}
                        print(json.dumps(line))
                        results.append(line)
    table = summarize(results)
    return {"events": events, "rounds": rounds, "before": before, "runs": results, "table": table}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median committed events/s per scenario and variant, and its ratio to the first variant."""
    table: list[dict[str, Any]] = []
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        rows = [r for r in results if r["scenario"] == scenario]
        medians = {
            variant: statistics.median(
                r["committed_events_per_s"] for r in rows if r["variant"] == variant
            )
            for variant in dict.fromkeys(r["variant"] for r in rows)
        }
        reference = next(iter(medians.values()))
        for variant, median in medians.items():
            p99 = statistics.median(r["latency_p99_ms"] for r in rows if r["variant"] == variant)
            table.append(
                {
                    "scenario": scenario,
                    "variant": variant,
                    "committed_events_per_s": round(median),
                    "ratio_to_before": round(median / reference, 3),
                    "latency_p99_ms": p99,
                }
            )
    print()
    print(f"{'scenario':<10}{'variant':<26}{'committed ev/s':>16}{'x before':>10}{'p99 ms':>9}")
    for row in table:
        print(
            f"{row['scenario']:<10}{row['variant']:<26}{row['committed_events_per_s']:>16,}"
            f"{row['ratio_to_before']:>10.3f}{row['latency_p99_ms']:>9.2f}"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE_OBSERVABILITY)
    parser.add_argument("--output", default="overhead.json", help="file in benchmarks/results")
    args = parser.parse_args()
    report = run_async(run(args.events, args.rounds, args.before))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
