"""The benchmarks in their short modes, so that they never rot: each must run to the end and
report sane numbers. (No speed is asserted here: timed tests flake on shared machines.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from benchmarks import bench_visibility
from benchmarks.common import (
    SCRAPE_MAX_S,
    SCRAPE_MIN_S,
    ServerProcess,
    execute,
    fresh_database,
    next_scrape_s,
)
from tests.processes import PROJECT_DIR

RESULTS = PROJECT_DIR / "benchmarks" / "results"


def run_benchmark(server_dsn: str, *args: str) -> str:
    env = {**os.environ, "XRAY_BENCH_DSN": server_dsn}
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_ingest_benchmark_smoke_run_commits_every_event(server_dsn: str) -> None:
    (RESULTS / "ingest-smoke.json").unlink(missing_ok=True)
    run_benchmark(server_dsn, "benchmarks.bench_ingest", "--smoke")
    report = json.loads((RESULTS / "ingest-smoke.json").read_text())
    assert (RESULTS / "ingest-smoke.png").read_bytes().startswith(b"\x89PNG")
    assert report["events"] == 4000
    assert all(value > 0 for value in report["ceiling_rows_per_s"].values())
    # Two rounds: the ceiling before them and after each.
    assert report["rounds"] == 2
    assert len(report["ceiling_runs"]["2 connection(s)"]) == 3
    assert len(report["ceiling_runs"]["2 connection(s), packed as the server does"]) == 3
    assert len(report["ceiling_runs"]["1 connection(s)"]) == 1
    assert len(report["runs"]) == 2 * len(report["results"])
    # The HTTP floor runs after each round of single events, and the best run counts.
    floors = report["http_floor_runs"]
    assert len(floors) == 2
    assert report["http_floor_requests_per_s"] == max(f["requests_per_s"] for f in floors)
    for floor in floors:
        assert 0 < floor["latency_p50_ms"] <= floor["latency_p99_ms"]
        assert floor["server_cpu_us_per_request"] > 0
    for result in report["results"]:
        assert result["rounds"] == 2
        assert result["committed_min"] <= result["committed_events_per_s"]
        assert result["committed_events_per_s"] <= result["committed_max"]
        assert sorted(result["committed_by_round"]) == [
            result["committed_min"],
            result["committed_max"],
        ]
        assert (result["ratio_to_fast"] is not None) == result["scenario"].endswith("durable")
        assert (result["ratio_to_http_floor"] is not None) == (result["scenario"] == "single")
        assert result["committed_events_per_s"] > 0
        assert result["ratio_to_ceiling"] > 0
        assert result["server_peak_rss_mib"] > 0
        assert result["server_cpu_us_per_event"] > 0
        assert result["load_generator_cpu_us_per_event"] > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_instructions_benchmark_counts_the_server_of_each_checkout(
    server_dsn: str, tmp_path: Path
) -> None:
    output = run_benchmark(
        server_dsn,
        "benchmarks.bench_instructions",
        *("--batch", "10", "--events", "200", "--connections", "2", "--against", "HEAD"),
        *("--durable", "--keep", str(tmp_path)),
    )
    before, now = (json.loads(line) for line in output.splitlines())
    assert (before["checkout"], now["checkout"]) == ("HEAD", "this checkout")
    for result in (before, now):
        assert result["events"] == 200
        assert result["durable"] is True
        # A batch event costs the server tens of thousands of instructions, not a handful.
        assert 10_000 < result["instructions_per_event"] < 10_000_000
    assert now["ratio_to_first"] == round(
        now["instructions_per_event"] / before["instructions_per_event"], 4
    )
    saved = json.loads((RESULTS / "instructions.json").read_text())
    assert saved == [before, now]
    # Each dump, kept for callgrind_annotate, holds its own checkout's total.
    for name, result in (("HEAD", before), ("this_checkout", now)):
        dump = (tmp_path / f"callgrind.{name}.out").read_text()
        assert f"\nsummary: {result['instructions']}\n" in dump


async def test_a_stopped_benchmark_server_still_gives_its_log(server_dsn: str) -> None:
    # A benchmark that fails after its server stopped reports the server's log.
    async with fresh_database(server_dsn) as dsn:
        server = ServerProcess(dsn)
        try:
            await server.wait_ready()
        finally:
            server.stop()
    log = server.output()
    assert "xray-ingest ready" in log
    assert "Finished server process" in log


def test_dedupe_benchmark_runs(server_dsn: str) -> None:
    line = run_benchmark(server_dsn, "benchmarks.bench_dedupe", "--events", "10000")
    result = json.loads(line.strip().splitlines()[-1])
    assert result["new_rows_per_s"] > 0 and result["one_repeat_rows_per_s"] > 0


async def test_queries_benchmark_smoke_run_times_every_endpoint(server_dsn: str) -> None:
    database = f"xray_bench_smoke_{uuid.uuid4().hex[:8]}"
    (RESULTS / "queries-smoke.json").unlink(missing_ok=True)
    try:
        run_benchmark(
            server_dsn,
            "benchmarks.bench_queries",
            "--traces=300",
            "--repeat=5",
            "--index-events=2000",
            f"--database={database}",
            "--output=queries-smoke.json",
        )
    finally:
        await execute(server_dsn, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    report = json.loads((RESULTS / "queries-smoke.json").read_text())
    assert len(report["latency_ms"]) == 15
    assert all(timing["p50"] > 0 for timing in report["latency_ms"].values())
    assert report["copy_rows_per_s_by_index"]["all indexes"] > 0


def test_visibility_benchmark_sees_every_probe(server_dsn: str) -> None:
    args = ("benchmarks.bench_visibility", "--rate", "2000", "--seconds", "2")
    result = json.loads(run_benchmark(server_dsn, *args).strip().splitlines()[-1])
    # Both passes, before and after the CHECKPOINT, each with its own probes.
    for figures in (result, result["before_checkpoint"]):
        assert figures["probes"] > 0
        assert figures["visibility_p50_ms"] > 0
        assert figures["background_events_per_s"] > 0


def test_visibility_benchmark_runs_at_half_the_last_ingest_peak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_visibility, "RESULTS_DIR", tmp_path)
    assert bench_visibility.half_the_peak() == (36_000, "default")
    report = {"results": [{"committed_events_per_s": 50_001}, {"committed_events_per_s": 9_000}]}
    (tmp_path / "ingest.json").write_text(json.dumps(report))
    assert bench_visibility.half_the_peak()[0] == 25_000


def test_growth_benchmark_reports_each_size_and_what_postgres_did(server_dsn: str) -> None:
    args = ("benchmarks.bench_growth", "--sizes", "0,5000", "--events", "2000", "--rounds", "2")
    lines = [json.loads(line) for line in run_benchmark(server_dsn, *args).strip().splitlines()]
    assert [line["stored_rows"] for line in lines] == [0, 5000]
    for line in lines:
        assert len(line["committed_by_round"]) == 2
        assert line["committed_events_per_s"] == sum(line["committed_by_round"]) / 2  # median
        assert line["committed_events_per_s"] > 0
    assert lines[1]["vs_empty"] > 0
    # Every event writes WAL; the indexes exist and were measured.
    assert all(line["wal_bytes_per_event"] > 0 for line in lines)
    assert "events_pkey" in lines[1]["index_mib_after"]


def test_overhead_benchmark_compares_a_checkout_with_this_one(server_dsn: str) -> None:
    (RESULTS / "overhead-smoke.json").unlink(missing_ok=True)
    args = (
        "--events",
        "1000",
        "--rounds",
        "1",
        "--before",
        "HEAD",
        "--output",
        "overhead-smoke.json",
    )
    run_benchmark(server_dsn, "benchmarks.bench_overhead", *args)
    report = json.loads((RESULTS / "overhead-smoke.json").read_text())
    assert len(report["runs"]) == 9  # 3 scenarios x 3 variants
    assert all(run["committed_events_per_s"] > 0 for run in report["runs"])
    assert {row["ratio_to_before"] for row in report["table"][::3]} == {1.0}


def test_scrapes_close_in_on_the_end_of_the_drain() -> None:
    # The first scrape gives no rate yet: the next comes soon.
    assert next_scrape_s(10_000, None, (1.0, 0)) == SCRAPE_MIN_S
    # 10,000 events in 0.05 s since the last: 20,000 left take 0.1 s, and half of that is waited.
    assert next_scrape_s(20_000, (1.0, 0), (1.05, 10_000)) == pytest.approx(0.05)
    # Far from the end the wait is capped; near it, floored.
    assert next_scrape_s(10**7, (1.0, 0), (1.05, 10_000)) == SCRAPE_MAX_S
    assert next_scrape_s(10, (1.0, 0), (1.05, 10_000)) == SCRAPE_MIN_S
    # No progress since the last scrape (the database away): the longest wait.
    assert next_scrape_s(5_000, (1.0, 10_000), (1.05, 10_000)) == SCRAPE_MAX_S
