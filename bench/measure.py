"""One measured round: load processes against one server, its CPU and theirs over the window."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field

from bench import load
from bench.procs import Server, cpu_seconds, database_cpu_seconds
from bench.seed import Shape

CPUS = os.cpu_count() or 1


@dataclass
class Round:
    calls: int
    calls_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    codes: dict[str, int]  # status code name -> calls
    server_cpu_us_per_call: float
    server_cpu_share: float  # of the whole machine (all cores), 0..1
    client_cpu_share: float
    server_rss_kib: float = 0.0  # at the end of the window
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    # PostgreSQL's or MariaDB's processes (procs.database_cpu_seconds); 0 on SQLite.
    database_cpu_us_per_call: float = 0.0


def window_round(
    *,
    latencies_ns: list,
    calls: int,
    duration: float,
    codes: dict[str, int],
    server_cpu_s: float,
    client_cpu_s: float,
    methods: dict[str, dict[str, float]],
    server_rss_kib: float = 0.0,
    database_cpu_s: float = 0.0,
) -> Round:
    """The figures of one measured window; latencies_ns sorted, CPU times in seconds."""
    return Round(
        calls=calls,
        calls_per_s=calls / duration,
        p50_ms=percentile(latencies_ns, 0.50) / 1e6,
        p90_ms=percentile(latencies_ns, 0.90) / 1e6,
        p99_ms=percentile(latencies_ns, 0.99) / 1e6,
        codes=dict(codes),
        server_cpu_us_per_call=server_cpu_s / calls * 1e6 if calls else float("nan"),
        server_cpu_share=server_cpu_s / (duration * CPUS),
        client_cpu_share=client_cpu_s / (duration * CPUS),
        server_rss_kib=server_rss_kib,
        methods=methods,
        database_cpu_us_per_call=database_cpu_s / calls * 1e6 if calls else float("nan"),
    )


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def drive(
    server: Server,
    mix: str,
    shape: Shape,
    *,
    processes: int,
    coroutines: int,
    duration: float,
    warmup: float,
    seed: int = 1,
    channels: int = 1,
) -> Round:
    ctx = mp.get_context("spawn")  # no grpc state is inherited by the load processes
    pipes, workers = [], []
    for index in range(processes):
        parent, child = ctx.Pipe()
        spec = load.LoadSpec(
            server.address, mix, shape, index, processes, coroutines, seed, channels
        )
        worker = ctx.Process(target=load.worker, args=(spec, child), daemon=True)
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    try:
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError(f"a load process could not reach {server.name}")
        start_ns = time.monotonic_ns() + int(warmup * 1e9)
        end_ns = start_ns + int(duration * 1e9)
        for pipe in pipes:
            pipe.send((start_ns, end_ns))
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        server0 = server.cpu_seconds()
        client0 = sum(cpu_seconds(w.pid) for w in workers)
        database0 = database_cpu_seconds()
        time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
        server1 = server.cpu_seconds()
        client1 = sum(cpu_seconds(w.pid) for w in workers)
        database1 = database_cpu_seconds()
        rss = server.rss_kib()
        reports = []
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("a load process did not report")
            reports.append(pipe.recv())
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    latencies: dict[str, array] = {m: array("q") for m in load.METHODS}
    codes: Counter = Counter()
    for raw, method_codes in reports:
        for method, data in raw.items():
            latencies[method].frombytes(data)
        codes.update(method_codes)
    everything = sorted(v for a in latencies.values() for v in a)
    calls = sum(codes.values())
    by_code: Counter = Counter()
    for (_method, code), n in codes.items():
        by_code[code] += n
    methods = {}
    for method, values in latencies.items():
        if values:
            ordered = sorted(values)
            methods[method] = {
                "calls": len(ordered),
                "p50_ms": percentile(ordered, 0.50) / 1e6,
                "p99_ms": percentile(ordered, 0.99) / 1e6,
            }
    return window_round(
        latencies_ns=everything,
        calls=calls,
        duration=duration,
        codes=by_code,
        server_cpu_s=server1 - server0,
        client_cpu_s=client1 - client0,
        methods=methods,
        server_rss_kib=rss,
        database_cpu_s=database1 - database0 if server.remote_database else 0.0,
    )


NUMBERS = (
    "calls_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "server_cpu_us_per_call",
    "server_cpu_share",
    "client_cpu_share",
    "server_rss_kib",
    "database_cpu_us_per_call",
)


def summarize(rounds: list[Round]) -> dict:
    """Medians of the rounds' figures; codes summed over every round."""
    summary = {key: statistics.median(getattr(r, key) for r in rounds) for key in NUMBERS}
    codes: Counter = Counter()
    for r in rounds:
        codes.update(r.codes)
    summary["codes"] = dict(codes)
    summary["rounds"] = [asdict(r) for r in rounds]
    return summary
