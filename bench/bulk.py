"""`make bench-import` (and the bulk lines of `make bench`): CSV import throughput, and
single-call latency while batches run.

python -m bench bulk [--database-url URL] [--rows 20000] [--seconds 10] [--strict]
(or python -m bench.bulk): a server on a fresh database (a new SQLite file by default,
or an empty database at URL), then
1. `enrollment-client import` of a ROWS-row student_id,course_id file, timed from
   start to exit: enrollments per second;
2. single calls (EnrollStudent then DropCourse of one pair, and GetCourse) from 2
   threads for SECONDS, first alone, then while 2 threads run BatchEnrollStudents and
   BatchDropCourses of 1000 items back to back from 2 processes of their own (half of
   each in the singles' courses):
   p50/p99/max of each, and the calls that failed, by status code.
Then PASS/FAIL against TARGETS; the exit code is 1 on a FAIL only with --strict.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import grpc

from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.server.persistence import engine, migrator
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.servers import free_port

BIN = Path(sys.executable).parent
COURSES = 10

# What `make bench` holds the bulk path to, on the machine's default (SQLite) database.
IMPORT_TARGET = 2_000  # enrollments/s of the 20,000-row import, at least
# Single writes (EnrollStudent, DropCourse) while batches of 1000 run back to back, in
# the same courses: p99 at most this, and none failing.
SINGLE_P99_TARGET_MS = 250.0
# Processes sending batches back to back. A single write waits, in arrival order, for at
# most the batch running and one queued per other sender: its p99 beyond SENDERS times a
# batch's p99 would mean it was passed over (starved).
SENDERS = 2


def _serve(url: str) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [str(BIN / "enrollment-server"), "serve", "--address", address, "--database-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return process, address


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {"n": 0}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"n": len(values), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": values[-1]}


def _timed(call, request, into: list[float], failed: Counter) -> None:
    """One call: its latency (ms) into `into`, or its status code counted in failed."""
    started = time.perf_counter()
    try:
        call(request, timeout=30)
    except grpc.RpcError as error:
        failed[error.code().name] += 1
        return
    into.append((time.perf_counter() - started) * 1000)


def _singles(
    address: str, student_ids: list[int], course_id: int, stop: threading.Event, failed: Counter
):
    """EnrollStudent + DropCourse of one pair, then GetCourse, in a loop: latencies (ms)."""
    writes: list[float] = []
    reads: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        i = 0
        while not stop.is_set():
            student = student_ids[i % len(student_ids)]
            i += 1
            for call, request in (
                (
                    stub.EnrollStudent,
                    pb.EnrollStudentRequest(student_id=student, course_id=course_id),
                ),
                (stub.DropCourse, pb.DropCourseRequest(student_id=student, course_id=course_id)),
            ):
                _timed(call, request, writes, failed)
            _timed(stub.GetCourse, pb.GetCourseRequest(course_id=course_id), reads, failed)
    return writes, reads


def _batches(address: str, pairs: list[tuple[int, int]], stop, ready) -> tuple[list, dict]:
    """In a process of its own (so that building and reading batches of 1000 never holds
    the GIL the single calls' threads need): batch_enroll then batch_drop of pairs, back
    to back, until stop is set; their latencies (ms) and failures by status."""
    took: list[float] = []
    failed: Counter = Counter()
    with EnrollmentClient(address, timeout=60) as client:
        ready.put(True)
        while not stop.is_set():
            for call in (client.batch_enroll, client.batch_drop):
                started = time.perf_counter()
                try:
                    call(pairs)
                except ClientError as error:
                    failed[f"batch {error.code} {error.reason}".strip()] += 1
                    continue
                took.append((time.perf_counter() - started) * 1000)
    return took, dict(failed)


def _latency(address, singles_students, courses, batch_pairs, seconds: float) -> dict:
    spawn = multiprocessing.get_context("spawn")
    failed: Counter = Counter()
    with (
        spawn.Manager() as manager,
        ProcessPoolExecutor(max(1, len(batch_pairs)), mp_context=spawn) as processes,
        ThreadPoolExecutor(2) as threads,
    ):
        stop, ready = manager.Event(), manager.Queue()
        batches = [processes.submit(_batches, address, p, stop, ready) for p in batch_pairs]
        for _ in batch_pairs:
            ready.get(timeout=120)  # every batch sender connected: measure from now
        singles = [
            threads.submit(_singles, address, singles_students[k::2], courses[k], stop, failed)
            for k in range(2)
        ]
        time.sleep(seconds)
        stop.set()
        writes = [w for f in singles for w in f.result()[0]]
        reads = [r for f in singles for r in f.result()[1]]
        batch_ms = []
        for f in batches:
            took, batch_failed = f.result()
            batch_ms += took
            failed.update(batch_failed)
    return {
        "single_writes": _percentiles(writes),
        "single_reads": _percentiles(reads),
        "batches_of_1000": _percentiles(batch_ms),
        "failed": dict(failed),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default="", help="an empty database (default: SQLite)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the imported CSV")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds alone, then under batches"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/bench.db"
        db = engine.open_pool(url, max_connections=1, create=True)
        migrator.migrate(db)
        engine.close_pool()
        server, address = _serve(url)
        try:
            rate, alone, loaded = _measure(address, Path(tmp), args.rows, args.seconds)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    print(f"import: {args.rows} rows at {rate:,.0f} enrollments/s")
    for name, figures in (("alone", alone), ("during batches of 1000", loaded)):
        for kind, p in figures.items():
            if kind != "failed" and p.get("n"):
                print(
                    f"{name:>24} {kind:>16}: n={p['n']:>6} p50={p['p50_ms']:7.2f} ms "
                    f"p99={p['p99_ms']:7.2f} ms max={p['max_ms']:7.2f} ms"
                )
        if figures["failed"]:
            print(f"{name:>24} failed calls: {figures['failed']}")
    p99 = loaded["single_writes"].get("p99_ms", float("inf"))
    batch_p99 = loaded["batches_of_1000"].get("p99_ms", 0.0)
    failed = sum(alone["failed"].values()) + sum(loaded["failed"].values())
    verdicts = [
        (rate >= IMPORT_TARGET, f"import >= {IMPORT_TARGET:,} enrollments/s: {rate:,.0f}"),
        (
            p99 <= SINGLE_P99_TARGET_MS,
            f"single-write p99 during batches of 1000 <= {SINGLE_P99_TARGET_MS:.0f} ms: "
            f"{p99:.1f} ms",
        ),
        (
            p99 <= SENDERS * batch_p99,
            f"single writes never starved: p99 {p99:.1f} ms <= {SENDERS} x batch p99 "
            f"({SENDERS * batch_p99:.1f} ms, the batches that can be ahead of one)",
        ),
        (failed == 0, f"no call failed: {failed} failed"),
    ]
    for ok, line in verdicts:
        print(f"{'PASS' if ok else 'FAIL'} bulk: {line}")
    return 1 if args.strict and not all(ok for ok, _ in verdicts) else 0


def _measure(address: str, tmp: Path, rows_wanted: int, seconds: float):
    """The import's enrollments/s, and the latencies alone and during batches."""
    per_course = rows_wanted // COURSES
    with EnrollmentClient(address, timeout=60) as client:
        courses = [client.create_course(f"B-{c}", "Bench").id for c in range(COURSES + 4)]
        with ThreadPoolExecutor(4) as pool:
            students = list(
                pool.map(
                    lambda i: client.create_student("S", f"b{i}@example.com").id,
                    range(max(per_course, 2400)),
                )
            )
    rows = [(s, c) for c in courses[:COURSES] for s in students[:per_course]]
    random.Random(1).shuffle(rows)
    path = tmp / "enrollments.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["student_id", "course_id"])
        writer.writerows(rows)
    started = time.perf_counter()
    subprocess.run(
        [str(BIN / "enrollment-client"), "--address", address, "--timeout", "120",
         "import", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    rate = len(rows) / (time.perf_counter() - started)

    extra = courses[COURSES:]
    singles_students = students[-200:]
    # Each batch: 500 pairs in a course of its own and 500 in the course the
    # single calls use, so they meet on its row lock as well as the writer lock.
    batch_pairs = [
        [(s, extra[2 + k]) for s in students[k * 500 : k * 500 + 500]]
        + [(s, extra[k]) for s in students[1000 + k * 500 : 1000 + k * 500 + 500]]
        for k in range(SENDERS)
    ]
    alone = _latency(address, singles_students, extra[:2], [], seconds)
    loaded = _latency(address, singles_students, extra[:2], batch_pairs, seconds)
    return rate, alone, loaded


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
