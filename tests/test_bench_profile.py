"""`make bench-profile`'s summaries (bench/profile.py): the server's SQLite write groups,
and its CPU and context switches by thread."""

from __future__ import annotations

import os
import threading

from bench.procs import PYTHON_THREADS, ThreadStats, thread_stats
from bench.profile import threads_cpu, write_groups

NAME = "enrollment_sqlite_write_group_size"


def histogram(counts: dict[str, float], total: float) -> dict[tuple[str, tuple], float]:
    """Prometheus samples of the histogram: cumulative buckets, count and sum."""
    samples: dict[tuple[str, tuple], float] = {}
    cumulative = 0.0
    for bound, count in counts.items():
        cumulative += count
        samples[(f"{NAME}_bucket", (("le", bound),))] = cumulative
    samples[(f"{NAME}_count", ())] = cumulative
    samples[(f"{NAME}_sum", ())] = total
    return samples


def test_the_groups_are_told_by_size_with_the_pauses():
    metrics = histogram({"1.0": 2, "2.0": 0, "4.0": 5, "8.0": 2, "16.0": 1, "+Inf": 0}, 41)
    metrics[("enrollment_sqlite_write_pauses_total", ())] = 3
    assert write_groups(metrics) == (
        "write groups: 10 committed 41 writes (4.1 a group); groups by size 1: 2, 3-4: 5, "
        "5-8: 2, 9-16: 1; pauses (writes sent to the writer thread for a while) 3"
    )


def test_no_groups_are_said_to_be_none():
    assert write_groups({}).startswith("write groups: none")


def stats(seconds: float, voluntary: int, involuntary: int, threads: int = 1) -> ThreadStats:
    return ThreadStats(seconds, voluntary, involuntary, threads)


def test_cpu_and_switches_are_told_a_call_in_all_and_by_thread():
    before = {
        "grpc-loop": stats(1.0, 10, 1),
        "rpc_0": stats(0.5, 20, 2),
        "rpc_1": stats(0.5, 20, 2),
        "health-probe": stats(0.1, 5, 0),
    }
    after = {
        "grpc-loop": stats(3.0, 110, 51),  # +2 s of CPU, 100 + 50 switches
        "rpc_0": stats(1.5, 220, 2),  # +1 s, 200 + 0
        "rpc_1": stats(1.5, 220, 152),  # +1 s, 200 + 150
        "health-probe": stats(0.1, 5, 0),  # idle: left out
        "event_engine": stats(0.1, 95, 0, threads=2),  # new in the window: all of it counts
    }
    times = ((10.0, 5.0), (13.0, 7.0))  # +3 s user, +2 s system: 5 s
    lines = threads_cpu(before, after, times, 1000).splitlines()
    assert lines[0] == (
        "server CPU a call: 5000 µs (user 3000, system 2000); "
        "context switches a call: 0.6 voluntary, 0.2 involuntary"
    )
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["grpc-loop"] == ["grpc-loop", "2000", "0.10", "+", "0.05"]
    assert rows["rpc_*"] == ["rpc_*", "(2)", "2000", "0.40", "+", "0.15"]
    assert rows["event_engine"] == ["event_engine", "(2)", "100", "0.10", "+", "0.00"]
    assert [line.split()[0] for line in lines[2:]] == ["grpc-loop", "rpc_*", "event_engine"]


def test_a_live_process_has_its_threads_cpu_and_switches_read():
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="waiting_0")
    worker.start()
    try:
        found = thread_stats([os.getpid()], {worker.native_id: worker.name})
    finally:
        stop.set()
        worker.join()
    assert found["waiting_0"].threads == 1
    assert found[PYTHON_THREADS].threads >= 1  # the others, unnamed here
    assert all(s.seconds >= 0 and s.voluntary >= 0 and s.involuntary >= 0 for s in found.values())
    assert sum(s.voluntary for s in found.values()) > 0  # the test process has waited
