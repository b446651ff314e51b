"""`make bench-scale`: per-call latency at 10,000 enrollments against 1,000,000.

Two databases seeded in bulk (1,000 and 100,000 students, 10 courses each on average,
course 1 holding a roster of 1,000 and 10,000), one server on each. Calls go one at a
time and alternate between the two servers call by call, so that a busy moment on a
shared machine lands on both alike; the p99 of each kind is over every round's calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import procs
from bench.measure import percentile
from bench.seed import Shape, seed
from enrollment.server.startup.config import ServerConfig
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.servers import free_port

SMALL, LARGE = "10k", "1M"
SHAPES = {
    SMALL: Shape(students=1_000, courses=500, per_student=10, roster=1_000),
    LARGE: Shape(students=100_000, courses=500, per_student=10, roster=10_000),
}
MAX_GROWTH = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400, help="calls of each kind per round")
    parser.add_argument("--log-level", default="INFO", help="the servers' --log-level")
    parser.add_argument("--json", default="", help="results file (default bench/results/…)")


def _last_page_token(fetch) -> str:
    """Walk every page (the default size, 50) as a client would; the last page's token."""
    token = ""
    while True:
        reply = fetch(0, token)
        if not reply.next_page_token:
            return token
        token = reply.next_page_token


class Probe:
    """The calls measured against one server, one at a time."""

    def __init__(self, address: str, shape: Shape, seed_value: int) -> None:
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = pb_grpc.EnrollmentServiceStub(self.channel)
        self.shape = shape
        self.rng = random.Random(seed_value)
        stub = self.stub
        self.last_students = _last_page_token(
            lambda size, token: stub.ListStudents(
                pb.ListStudentsRequest(page_size=size, page_token=token)
            )
        )
        self.last_roster = _last_page_token(
            lambda size, token: stub.ListStudents(
                pb.ListStudentsRequest(course_id=1, page_size=size, page_token=token)
            )
        )
        self.last_courses = _last_page_token(
            lambda size, token: stub.ListCourses(
                pb.ListCoursesRequest(page_size=size, page_token=token)
            )
        )

    def calls(self):
        """(name, thunk) pairs, one of each kind."""
        stub, rng, shape = self.stub, self.rng, self.shape
        student = rng.randint(1, shape.students)
        yield "GetStudent", lambda: stub.GetStudent(pb.GetStudentRequest(student_id=student))
        yield (
            "ListCourses of a student",
            lambda: stub.ListCourses(pb.ListCoursesRequest(student_id=student)),
        )
        yield (
            "ListStudents roster, 1st page",
            lambda: stub.ListStudents(pb.ListStudentsRequest(course_id=1)),
        )
        yield (
            "ListStudents roster, last page",
            lambda: stub.ListStudents(
                pb.ListStudentsRequest(course_id=1, page_token=self.last_roster)
            ),
        )
        yield (
            "ListStudents all, last page",
            lambda: stub.ListStudents(pb.ListStudentsRequest(page_token=self.last_students)),
        )
        yield (
            "ListCourses all, last page",
            lambda: stub.ListCourses(pb.ListCoursesRequest(page_token=self.last_courses)),
        )
        taken = shape.enrolled(student)
        course = rng.randint(2, shape.courses)
        while course in taken:
            course = rng.randint(2, shape.courses)
        pair = {"student_id": student, "course_id": course}
        yield "EnrollStudent", lambda: stub.EnrollStudent(pb.EnrollStudentRequest(**pair))
        # Dropped again at once, so the data does not drift.
        yield "DropCourse", lambda: stub.DropCourse(pb.DropCourseRequest(**pair))


def _round(probes: dict[str, Probe], calls: int, latencies: dict, first: str) -> None:
    """calls of each kind on each server, the servers taking turns call by call."""
    order = [first] + [name for name in probes if name != first]
    for _ in range(calls):
        batches = {name: list(probes[name].calls()) for name in order}
        for index in range(len(batches[first])):
            for name in order:
                kind, call = batches[name][index]
                t0 = time.perf_counter_ns()
                call()
                latencies[name].setdefault(kind, []).append(time.perf_counter_ns() - t0)


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="enrollment-scale-") as tmp:
        tmpdir = Path(tmp)
        servers = {}
        for name, shape in SHAPES.items():
            url = f"sqlite:///{tmpdir / f'{name}.db'}"
            started = time.monotonic()
            procs.migrate(url)
            seed(url, shape)
            print(
                f"{name}: seeded {shape.students} students, {shape.enrollments} enrollments "
                f"in {time.monotonic() - started:.0f}s",
                file=sys.stderr,
            )
            servers[name] = procs.enrollment_server(
                free_port(),
                url,
                tmpdir / f"{name}.log",
                max_workers=ServerConfig().max_workers,
                workers=1,
                log_level=args.log_level,
            )
        latencies: dict[str, dict[str, list[int]]] = {name: {} for name in SHAPES}
        try:
            probes = {}
            for name, server in servers.items():
                server.start()
                probes[name] = Probe(server.address, SHAPES[name], 7)
            _round(probes, 20, {name: {} for name in SHAPES}, SMALL)  # warm up
            for index in range(args.rounds):
                _round(probes, args.calls, latencies, SMALL if index % 2 == 0 else LARGE)
                print(f"  round {index + 1}/{args.rounds} done", file=sys.stderr)
            for probe in probes.values():
                probe.channel.close()
        finally:
            for server in servers.values():
                server.stop()

    rows = []
    for call in latencies[SMALL]:
        small = percentile(sorted(latencies[SMALL][call]), 0.99) / 1e6
        large = percentile(sorted(latencies[LARGE][call]), 0.99) / 1e6
        growth = large / small if small else float("nan")
        rows.append(
            {
                "call": call,
                "p99_ms_10k": small,
                "p99_ms_1M": large,
                "growth": growth,
                "verdict": "PASS" if growth <= MAX_GROWTH else "FAIL",
            }
        )
    lines = [
        f"enrollment bench-scale  {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}  "
        f"p99 of {args.rounds} x {args.calls} calls of each kind, one at a time, "
        "servers alternating call by call",
        "",
        f"{'call':32} {'p99 10k ms':>10} {'p99 1M ms':>10} {'growth':>7}  (want <= {MAX_GROWTH}x)",
    ]
    for r in rows:
        lines.append(
            f"{r['call']:32} {r['p99_ms_10k']:10.2f} {r['p99_ms_1M']:10.2f} "
            f"{r['growth']:6.2f}x  {r['verdict']}"
        )
    print("\n".join(lines))
    path = Path(args.json or f"bench/results/scale-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"shapes": {k: vars(v) for k, v in SHAPES.items()}, "rows": rows}, indent=1)
    )
    print(f"\nresults: {path}")
    return 1 if any(r["verdict"] == "FAIL" for r in rows) else 0
