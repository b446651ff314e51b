"""`make bench-profile`'s summaries (bench/profile.py): the server's SQLite write groups,
and its CPU and context switches by thread."""

from __future__ import annotations

import os

from bench.profile import python_thread_names, thread_snapshot, threads_cpu, write_groups

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


DUMP = """Process 8782: /work/main/.venv/bin/python .venv/bin/enrollment-server serve
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)

Thread 8784 (idle): "grpc-loop"
    BaseEventLoop._run_once (asyncio/base_events.py:1922)
Thread 8790 (active+gil): "rpc_0"
    WorkerPool._serve (server/transport/pool.py:80)
Thread 8791 (idle): "rpc_1"
"""


def test_python_threads_are_named_from_a_py_spy_dump():
    assert python_thread_names(DUMP) == {8784: "grpc-loop", 8790: "rpc_0", 8791: "rpc_1"}


def test_cpu_and_switches_are_told_a_call_in_all_and_by_thread():
    before = {
        8784: ("enrollment-serv", 100, 10, 1),
        8790: ("enrollment-serv", 50, 20, 2),
        8791: ("enrollment-serv", 50, 20, 2),
        8800: ("event_engine", 10, 5, 0),
    }
    after = {
        8784: ("enrollment-serv", 300, 110, 51),  # +2 s of CPU, 100 + 50 switches
        8790: ("enrollment-serv", 150, 220, 2),  # +1 s, 200 + 0
        8791: ("enrollment-serv", 150, 220, 152),  # +1 s, 200 + 150
        8800: ("event_engine", 10, 5, 0),  # idle: left out
        8801: ("event_engine", 10, 100, 0),  # new in the window: all of it counts
    }
    times = ((1000, 500), (1300, 700))  # +3 s user, +2 s system: 5 s
    text = threads_cpu(before, after, times, python_thread_names(DUMP), 1000, 100.0)
    lines = text.splitlines()
    assert lines[0] == (
        "server CPU a call: 5000 µs (user 3000, system 2000); "
        "context switches a call: 0.6 voluntary, 0.2 involuntary"
    )
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["grpc-loop"] == ["grpc-loop", "2000", "0.10", "+", "0.05"]
    assert rows["rpc_*"] == ["rpc_*", "(2)", "2000", "0.40", "+", "0.15"]
    assert rows["event_engine"] == ["event_engine", "(2)", "100", "0.10", "+", "0.00"]
    assert [line.split()[0] for line in lines[2:]] == ["grpc-loop", "rpc_*", "event_engine"]


def test_a_live_process_has_its_threads_read():
    threads = thread_snapshot(os.getpid())
    assert os.getpid() in threads  # the main thread's id is the process's
    name, cpu, voluntary, involuntary = threads[os.getpid()]
    assert name and cpu >= 0 and voluntary >= 0 and involuntary >= 0
