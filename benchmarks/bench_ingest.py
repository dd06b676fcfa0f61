"""How many events/s does the server commit, against raw asyncpg COPY of the same rows?

Run as `python -m benchmarks.bench_ingest` (`make bench`). Prints one JSON line per scenario and
round, then a table of each scenario's medians over the rounds, and writes
benchmarks/results/ingest.json. The ceiling is measured in the same run, on the same table, so
the ratios hold even when absolute numbers drift on a shared machine; the scenarios run in
several interleaved rounds because the drift is fast too (±20% from one minute to the next was
seen on this class of machine), so one sample of a scenario says little about the next.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    HttpClient,
    ServerProcess,
    count_events,
    dumps,
    execute,
    fresh_database,
    machine_busy_seconds,
    percentile,
    postgres_server,
    realistic_events,
    run_async,
    wait_stored,
)
from xray_ingest import db
from xray_ingest.models import Row, decode_row

CEILING_BATCH = 5_000
# A client's wait after a 503 (queue full). Far below the server's Retry-After, so the server
# stays saturated; not so short that it spends its time reading bodies it must refuse (each
# refused 1000-event batch is a megabyte received and thrown away).
RETRY_503_S = 0.05


@dataclass
class Result:
    """One scenario, one round."""

    scenario: str
    batch_size: int
    connections: int
    events: int
    requests_per_s: float
    acked_events_per_s: float
    committed_events_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    server_peak_rss_mib: float
    refused_503: int
    # CPU microseconds per event while the scenario ran, by who spent them: the server (all its
    # processes), this load generator, and the rest of the machine (PostgreSQL, mostly).
    server_cpu_us_per_event: float
    load_generator_cpu_us_per_event: float
    other_cpu_us_per_event: float


@dataclass
class Summary(Result):
    """One scenario over the rounds: the median of each rate, latency and CPU figure (so the
    columns of one row need not come from the same round), the peak memory and the 503s over all
    rounds, and the spread of the committed rate."""

    rounds: int = 1
    committed_min: float = 0.0
    committed_max: float = 0.0
    committed_by_round: list[float] = field(default_factory=list)
    ratio_to_ceiling: float = float("nan")
    # Durable scenarios: the median over rounds of this scenario's committed rate against the
    # fast-mode scenario of the same batch size and connections, run just before it.
    ratio_to_fast: float | None = None
    # Single-event scenarios in fast mode: the committed rate against the best run of the HTTP
    # floor (see measure_floor).
    ratio_to_http_floor: float | None = None


_MEDIAN_FIELDS = (
    "committed_events_per_s",
    "requests_per_s",
    "acked_events_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "server_cpu_us_per_event",
    "load_generator_cpu_us_per_event",
    "other_cpu_us_per_event",
)


def summarize(rounds: list[Result]) -> Summary:
    """One scenario's results over its rounds."""
    first = rounds[0]
    committed = [r.committed_events_per_s for r in rounds]
    medians = {name: statistics.median(getattr(r, name) for r in rounds) for name in _MEDIAN_FIELDS}
    return Summary(
        scenario=first.scenario,
        batch_size=first.batch_size,
        connections=first.connections,
        events=first.events,
        rounds=len(rounds),
        committed_min=min(committed),
        committed_max=max(committed),
        server_peak_rss_mib=max(r.server_peak_rss_mib for r in rounds),
        refused_503=sum(r.refused_503 for r in rounds),
        committed_by_round=committed,
        **medians,
    )


async def truncate(dsn: str) -> None:
    await execute(dsn, "TRUNCATE events, traces, dead_letter_events", "CHECKPOINT")


@dataclass(frozen=True)
class Ceiling:
    """One way of writing the rows with raw COPY: over how many connections, and whether they
    are packed as the server packs them (copyformat) or handed to copy_records_to_table."""

    connections: int
    packed: bool = False

    def __str__(self) -> str:
        return f"{self.connections} connection(s)" + (
            ", packed as the server does" if self.packed else ""
        )


# The two-connection ceilings are measured before the rounds and again after each.
CEILINGS = [Ceiling(1), Ceiling(2), Ceiling(2, packed=True)]


async def copy_ceiling(dsn: str, rows: list[Row], connections: int, packed: bool = False) -> float:
    """Raw COPY of rows into events from this process, no HTTP: rows/s."""
    pool = await db.create_pool(dsn, max_size=connections)
    batches = [rows[i : i + CEILING_BATCH] for i in range(0, len(rows), CEILING_BATCH)]
    queue: asyncio.Queue[list[Row]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def worker() -> None:
        async with pool.acquire() as connection:
            while not queue.empty():
                batch = queue.get_nowait()
                if packed:
                    await db.copy_rows(connection, "events", batch)
                else:
                    await connection.copy_records_to_table(
                        "events", records=batch, columns=db.COPY_COLUMNS
                    )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    await pool.close()
    await truncate(dsn)
    return len(rows) / elapsed


def request_bodies(encoded: list[bytes], batch_size: int) -> list[bytes]:
    if batch_size == 1:
        return encoded
    return [
        b'{"events":[' + b",".join(encoded[i : i + batch_size]) + b"]}"
        for i in range(0, len(encoded), batch_size)
    ]


@dataclass
class Posted:
    """What posting a scenario's bodies took: each request's latency (sorted), the 503s that were
    retried, when the first was sent and the last answered (perf_counter), and the CPU seconds
    used by the server, the load generator and the whole machine before the first."""

    latencies: list[float]
    refusals: int
    started: float
    finished: float
    cpu_before: tuple[float, float, float]

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def ingest_path(batch_size: int, query: str = "") -> bytes:
    """Where requests of batch_size events go: single events as the SDK posts them, or batches."""
    return (b"/v1/events" if batch_size == 1 else b"/v1/events/batch") + query.encode()


async def post_all(
    server: ServerProcess, bodies: list[bytes], path: bytes, connections: int
) -> Posted:
    """Posts every body over `connections` keep-alive connections, one request at a time on each,
    retrying 503s; raises on any other status but 201 and 202."""
    await server.wait_ready()
    latencies: list[float] = []
    refusals = 0
    next_body = iter(bodies)

    async def worker() -> None:
        client = await HttpClient.connect(server.port)
        try:
            nonlocal refusals
            for body in next_body:
                while True:
                    sent = time.perf_counter()
                    status, payload = await client.request(b"POST", path, body)
                    latencies.append(time.perf_counter() - sent)
                    if status != 503:
                        break
                    # Queue full: the server's backpressure. Retry soon (sooner than its
                    # Retry-After, to keep it saturated) and count the refusal.
                    refusals += 1
                    await asyncio.sleep(RETRY_503_S)
                if status not in (201, 202):
                    raise RuntimeError(
                        f"status {status}: {payload[:200]!r}\n"
                        f"the server's log ends with:\n{server.output()[-3000:]}"
                    )
        finally:
            client.close()

    cpu_before = (server.cpu_seconds(), time.process_time(), machine_busy_seconds())
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    finished = time.perf_counter()
    latencies.sort()
    return Posted(latencies, refusals, started, finished, cpu_before)


def cpu_us_per_item(server: ServerProcess, posted: Posted, items: int) -> tuple[float, ...]:
    """CPU microseconds per item since posting began: the server's, the load generator's and the
    rest of the machine's."""
    server_cpu = server.cpu_seconds() - posted.cpu_before[0]
    load_cpu = time.process_time() - posted.cpu_before[1]
    other_cpu = machine_busy_seconds() - posted.cpu_before[2] - server_cpu - load_cpu
    return tuple(round(cpu * 1e6 / items, 1) for cpu in (server_cpu, load_cpu, other_cpu))


async def drive(
    dsn: str,
    encoded: list[bytes],
    batch_size: int,
    connections: int,
    query: str = "",
    keep_rows: bool = False,
    server: ServerProcess | None = None,
) -> Result:
    """Posts every event through a fresh server (or the one given, which is stopped after) and
    waits until all are committed; then empties the table unless keep_rows."""
    stored_before = await count_events(dsn)
    server = server or ServerProcess(dsn)
    try:
        bodies = request_bodies(encoded, batch_size)
        posted = await post_all(server, bodies, ingest_path(batch_size, query), connections)
        # Committed when the server's metrics say so (a server without /metrics: when count(*)
        # sees the rows). Then count(*) confirms, outside the timed span: it scans the whole
        # table, seconds at millions of stored rows.
        expected = stored_before + len(encoded)
        if not await server.wait_committed(len(encoded)):
            await wait_stored(dsn, expected)
        committed = time.perf_counter() - posted.started
        server_cpu, load_cpu, other_cpu = cpu_us_per_item(server, posted, len(encoded))
        if (stored := await count_events(dsn)) != expected:
            raise RuntimeError(f"{stored:,} rows stored, expected {expected:,}")
        latencies = posted.latencies
        result = Result(
            scenario=f"{'single' if batch_size == 1 else f'batch {batch_size}'}"
            + (" durable" if query else ""),
            batch_size=batch_size,
            connections=connections,
            events=len(encoded),
            requests_per_s=round(len(bodies) / posted.seconds),
            acked_events_per_s=round(len(encoded) / posted.seconds),
            committed_events_per_s=round(len(encoded) / committed),
            latency_p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
            latency_p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
            server_peak_rss_mib=round(server.peak_rss_mib(), 1),
            refused_503=posted.refusals,
            server_cpu_us_per_event=server_cpu,
            load_generator_cpu_us_per_event=load_cpu,
            other_cpu_us_per_event=other_cpu,
        )
    finally:
        server.stop()
    if not keep_rows:
        await truncate(dsn)
    return result


@dataclass
class HttpFloor:
    """One run of benchmarks.floor_app (a bare ASGI app on uvicorn run as `serve` runs it) driven
    with the single-event scenario's bodies and connections: what HTTP alone allows here."""

    requests_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    server_cpu_us_per_request: float
    load_generator_cpu_us_per_request: float


async def measure_floor(dsn: str, encoded: list[bytes], connections: int) -> HttpFloor:
    print(f"HTTP floor: a bare ASGI app, {connections} connections ...", file=sys.stderr)
    server = ServerProcess(dsn, module=("benchmarks.floor_app",))
    try:
        posted = await post_all(server, encoded, b"/v1/events", connections)
        server_cpu, load_cpu, _ = cpu_us_per_item(server, posted, len(encoded))
    finally:
        server.stop()
    floor = HttpFloor(
        requests_per_s=round(len(encoded) / posted.seconds),
        latency_p50_ms=round(percentile(posted.latencies, 0.50) * 1000, 2),
        latency_p99_ms=round(percentile(posted.latencies, 0.99) * 1000, 2),
        server_cpu_us_per_request=server_cpu,
        load_generator_cpu_us_per_request=load_cpu,
    )
    print(f"  {floor.requests_per_s:,.0f} requests/s", file=sys.stderr)
    return floor


def print_table(
    ceilings: dict[str, float], summaries: list[Summary], floors: list[HttpFloor]
) -> None:
    print()
    for name, value in ceilings.items():
        print(f"raw COPY ceiling, {name}: {value:,.0f} rows/s (the best of its runs)")
    print("x ceiling: against the best of these")
    rounds = max(s.rounds for s in summaries)
    print(f"medians over {rounds} round(s); committed min-max; peak RSS and 503s over all rounds")
    header = (
        f"{'scenario':<18}{'conns':>6}{'req/s':>9}{'acked ev/s':>12}{'committed ev/s':>16}"
        f"{'min-max':>17}{'x ceiling':>10}{'x fast':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'peak RSS MiB':>14}{'503s':>7}{'CPU us/event: server':>22}{'load gen':>10}{'rest':>7}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        spread = f"{s.committed_min:,.0f}-{s.committed_max:,.0f}"
        to_fast = "" if s.ratio_to_fast is None else f"{s.ratio_to_fast:.2f}"
        print(
            f"{s.scenario:<18}{s.connections:>6}{s.requests_per_s:>9,.0f}"
            f"{s.acked_events_per_s:>12,.0f}{s.committed_events_per_s:>16,.0f}{spread:>17}"
            f"{s.ratio_to_ceiling:>10.2f}{to_fast:>8}{s.latency_p50_ms:>9.2f}"
            f"{s.latency_p99_ms:>9.2f}{s.server_peak_rss_mib:>14.1f}{s.refused_503:>7}"
            f"{s.server_cpu_us_per_event:>22.1f}{s.load_generator_cpu_us_per_event:>10.1f}"
            f"{s.other_cpu_us_per_event:>7.1f}"
        )
    if floors:
        best = max(floors, key=lambda floor: floor.requests_per_s)
        print(
            f"\nHTTP floor (benchmarks.floor_app, single-event bodies), best of {len(floors)}: "
            f"{best.requests_per_s:,.0f} requests/s, p50 / p99 {best.latency_p50_ms:.2f} / "
            f"{best.latency_p99_ms:.2f} ms, CPU us/request: server "
            f"{best.server_cpu_us_per_request:.1f}, load gen "
            f"{best.load_generator_cpu_us_per_request:.1f}"
        )
        for s in summaries:
            if s.ratio_to_http_floor is not None:
                print(f"{s.scenario}: committed {s.ratio_to_http_floor:.2f} x the HTTP floor")


@dataclass(frozen=True)
class Scenario:
    batch_size: int
    connections: int
    durable: bool = False

    @property
    def has_http_floor(self) -> bool:
        """Single events in fast mode: the HTTP floor (measure_floor) runs after each round of it,
        with its bodies and connections, and its ratio to the floor is reported."""
        return self.batch_size == 1 and not self.durable


# Each durable scenario runs right after the fast one it is compared with, so that the two are
# measured as close together as they can be.
SCENARIOS = [
    Scenario(100, 8),
    Scenario(100, 8, durable=True),
    Scenario(1000, 4),
    Scenario(10, 16),
    Scenario(1, 64),
]
SMOKE_SCENARIOS = [Scenario(100, 4), Scenario(100, 4, durable=True), Scenario(1, 8)]
DEFAULT_ROUNDS = 3
SMOKE_ROUNDS = 2


async def measure_ceiling(dsn: str, rows: list[Row], ceiling: Ceiling, runs: list[float]) -> None:
    print(f"raw COPY ceiling, {ceiling} ...", file=sys.stderr)
    rate = round(await copy_ceiling(dsn, rows, ceiling.connections, ceiling.packed))
    print(f"  {rate:,.0f} rows/s", file=sys.stderr)
    runs.append(rate)


def durable_against_fast(
    scenarios: list[Scenario], by_scenario: list[list[Result]], summaries: list[Summary]
) -> None:
    """Sets each durable scenario's ratio_to_fast: the median over rounds of its committed rate
    against that of the fast scenario with the same batch size and connections."""
    for scenario, rounds, summary in zip(scenarios, by_scenario, summaries, strict=True):
        if not scenario.durable:
            continue
        fast = Scenario(scenario.batch_size, scenario.connections)
        if fast not in scenarios:
            continue
        fast_rounds = by_scenario[scenarios.index(fast)]
        ratios = [
            durable.committed_events_per_s / quick.committed_events_per_s
            for durable, quick in zip(rounds, fast_rounds, strict=True)
        ]
        summary.ratio_to_fast = round(statistics.median(ratios), 3)


async def run(events: int, scenarios: list[Scenario], rounds: int) -> dict[str, Any]:
    print(f"generating {events:,} events ...", file=sys.stderr)
    payloads = realistic_events(events)
    encoded = [dumps(event) for event in payloads]
    rows = [decode_row(body) for body in encoded]
    mean_size = sum(map(len, encoded)) / len(encoded)
    # Millions of objects the load generator keeps for the whole run: out of the collector's
    # sight, so that its full collections do not take CPU from the server being measured.
    gc.collect()
    gc.freeze()
    by_scenario: list[list[Result]] = [[] for _ in scenarios]
    floors: list[HttpFloor] = []
    with postgres_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            # The two-connection ceilings are measured before the scenarios and again after each
            # round, and the best run of the best way counts: it drifts between runs on a shared
            # machine, and the best is the harder bar.
            ceiling_runs: dict[Ceiling, list[float]] = {ceiling: [] for ceiling in CEILINGS}
            # The first COPY into a new database runs far slower than the next (29,444 against
            # 47,567 rows/s on one connection, back to back): a throwaway one goes first.
            print("warming up with a raw COPY ...", file=sys.stderr)
            await copy_ceiling(dsn, rows, 2)
            for ceiling, runs in ceiling_runs.items():
                await measure_ceiling(dsn, rows, ceiling, runs)
            for number in range(1, rounds + 1):
                for scenario, results in zip(scenarios, by_scenario, strict=True):
                    print(f"round {number}/{rounds}: {scenario} ...", file=sys.stderr)
                    result = await drive(
                        dsn,
                        encoded,
                        scenario.batch_size,
                        scenario.connections,
                        "?wait=true" if scenario.durable else "",
                    )
                    print(json.dumps({**asdict(result), "round": number}))
                    results.append(result)
                    if scenario.has_http_floor:
                        # Right after the scenario, so that both see the machine alike.
                        floor = await measure_floor(dsn, encoded, scenario.connections)
                        print(json.dumps({"http_floor": asdict(floor), "round": number}))
                        floors.append(floor)
                for ceiling, runs in ceiling_runs.items():
                    if ceiling.connections == 2:
                        await measure_ceiling(dsn, rows, ceiling, runs)
    ceilings = {str(ceiling): max(runs) for ceiling, runs in ceiling_runs.items()}
    best = max(ceilings.values())
    summaries = [summarize(results) for results in by_scenario]
    for summary in summaries:
        summary.ratio_to_ceiling = round(summary.committed_events_per_s / best, 3)
    durable_against_fast(scenarios, by_scenario, summaries)
    floor_best = max((floor.requests_per_s for floor in floors), default=None)
    for scenario, summary in zip(scenarios, summaries, strict=True):
        if scenario.has_http_floor and floor_best:
            summary.ratio_to_http_floor = round(summary.committed_events_per_s / floor_best, 3)
    print_table(ceilings, summaries, floors)
    return {
        "events": events,
        "mean_event_bytes": round(mean_size),
        "rounds": rounds,
        "ceiling_rows_per_s": ceilings,
        "ceiling_runs": {str(ceiling): runs for ceiling, runs in ceiling_runs.items()},
        "http_floor_requests_per_s": floor_best,
        "http_floor_runs": [asdict(floor) for floor in floors],
        "results": [asdict(s) for s in summaries],
        "runs": [
            {**asdict(r), "round": number}
            for results in by_scenario
            for number, r in enumerate(results, 1)
        ],
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Committed events/s per scenario (the median, with the spread over the rounds) beside the
    raw COPY ceilings of the same run, and the HTTP floor over the single-event scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [r["scenario"] for r in results]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    medians = [r["committed_events_per_s"] for r in results]
    spread = [
        [m - r["committed_min"] for m, r in zip(medians, results, strict=True)],
        [r["committed_max"] - m for m, r in zip(medians, results, strict=True)],
    ]
    axes.bar(names, medians, yerr=spread, capsize=4, color="#4477aa")
    styles = zip(["dotted", "dashed", "dashdot"], ["#999933", "#cc6677", "#882255"], strict=True)
    for (label, value), (style, colour) in zip(
        report["ceiling_rows_per_s"].items(), styles, strict=True
    ):
        axes.axhline(value, linestyle=style, color=colour, label=f"raw COPY, {label}")
    floor = report["http_floor_requests_per_s"]
    singles = [i for i, r in enumerate(results) if r["ratio_to_http_floor"] is not None]
    if floor and singles:
        # Across the bar's width (0.8 by default).
        axes.hlines(
            [floor] * len(singles),
            [i - 0.4 for i in singles],
            [i + 0.4 for i in singles],
            linewidth=2,
            color="#117733",
            label="HTTP floor: a bare ASGI app, requests/s",
        )
    # Headroom above the highest line for the legend.
    tallest = max(
        [*report["ceiling_rows_per_s"].values(), *(r["committed_max"] for r in results), floor or 0]
    )
    axes.set_ylim(0, 1.3 * tallest)
    axes.legend(loc="upper right", fontsize="small")
    axes.set_ylabel(f"committed events/s (median of {report['rounds']} rounds, min-max)")
    axes.set_title(f"xray-ingest: {report['events']:,} events of ~{report['mean_event_bytes']} B")
    axes.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--rounds", type=int, help=f"times each scenario runs (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the tests")
    args = parser.parse_args()
    events = 4_000 if args.smoke else args.events
    rounds = args.rounds or (SMOKE_ROUNDS if args.smoke else DEFAULT_ROUNDS)
    report = run_async(run(events, SMOKE_SCENARIOS if args.smoke else SCENARIOS, rounds))
    RESULTS_DIR.mkdir(exist_ok=True)
    name = "ingest-smoke" if args.smoke else "ingest"
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS_DIR / f"{name}.png")


if __name__ == "__main__":
    main()
