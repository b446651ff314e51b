"""`make bench-scale`: per-call latency at 10,000 enrollments against 10,000,000.

Two databases seeded in bulk with their change feed (1,000 and 1,000,000 students, 10
courses each over 1,000 courses; course 1 holding a roster of 1,000 and 10,000; one event
per course, student and enrollment), migrated to the migration before the newest and
then the newest timed; one server on each. --enrollments makes the large one smaller.
Calls go one at a time and alternate between the two servers call by call, so that a
busy moment on a shared machine lands on both alike; the p99 of each kind is over every
round's calls.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench import migration, procs
from bench.measure import percentile
from bench.seed import Shape, seed
from enrollment.server.persistence import engine
from enrollment.server.startup.config import ServerConfig
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.databases import Server as DatabaseServer
from tests.databases import query
from tests.servers import free_port

SMALL, LARGE = "small", "large"
MAX_GROWTH = 1.5
COURSES = 1_000
PER_STUDENT = 10


def shapes(enrollments: int) -> dict[str, Shape]:
    """1,000 students against enrollments/10, 10 courses each over 1,000 courses: at
    10,000,000 each course's roster holds 10,000 (course 1 is the one read); the small
    database's course 1 holds 1,000 (its students 1..1,000 all take it)."""
    return {
        SMALL: Shape(students=1_000, courses=COURSES, per_student=PER_STUDENT, roster=1_000),
        LARGE: Shape(students=enrollments // PER_STUDENT, courses=COURSES, per_student=PER_STUDENT),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--enrollments",
        type=int,
        default=10_000_000,
        help="enrollments of the large database (default 10,000,000; 1,000,000 is quick)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="a PostgreSQL server (postgresql://USER@HOST:PORT/DB) to make the two databases "
        "on (dropped at the end); default SQLite files",
    )
    parser.add_argument("--dir", default="", help="where the SQLite files go (default a temp dir)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400, help="calls of each kind per round")
    parser.add_argument("--log-level", default="INFO", help="the servers' --log-level")
    parser.add_argument("--json", default="", help="results file (default bench/results/…)")


def _last_page_token(fetch) -> str:
    """The token of the last page of the default size (50) of a walk to the end: big
    pages (1000) to near the end, then default ones, as a client paging through would."""
    token = ""
    while True:
        reply = fetch(1000, token)
        if not reply.next_page_token:
            break  # token: where the last big page starts
        token = reply.next_page_token
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
        self.head = stub.ListEvents(pb.ListEventsRequest(page_size=1)).head_sequence

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
        # A page (100) of the feed from somewhere in its middle fifth.
        middle = rng.randint(self.head * 2 // 5, self.head * 3 // 5)
        yield (
            "ListEvents, middle of the feed",
            lambda: stub.ListEvents(pb.ListEventsRequest(after_sequence=middle)),
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


def _count(n: int) -> str:
    """10000 -> 10k, 10000000 -> 10M (the table's headings)."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


@contextlib.contextmanager
def _databases(args: argparse.Namespace, tmpdir: Path) -> Iterator[dict[str, str]]:
    """Two new, empty databases: SQLite files in tmpdir, or made on the PostgreSQL server
    of --database-url (dropped again at the end)."""
    if not args.database_url:
        yield {name: f"sqlite:///{tmpdir / f'{name}.db'}" for name in (SMALL, LARGE)}
        return
    server = DatabaseServer(engine.parse(args.database_url).kind, args.database_url)
    urls: dict[str, str] = {}
    try:
        for name in (SMALL, LARGE):
            urls[name] = server.create(prefix=f"enrollment_scale_{name}")
        yield urls
    finally:
        for url in urls.values():
            server.drop(url)


def _size_on_disk(url: str) -> int:
    target = engine.parse(url)
    if target.kind == "sqlite":
        path = Path(target.params["database"])
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    (size,) = query(url, "SELECT pg_database_size(current_database())")[0]
    return int(size)


def _build(url: str, shape: Shape) -> dict:
    """Migrate to the migration before the newest, seed in bulk, time the newest."""
    started = time.monotonic()
    migration.migrate_all_but_newest(url)
    seed(url, shape, events=True)
    seeded = time.monotonic() - started
    applied, migrate_s = migration.migrate_timed(url)
    return {
        "students": shape.students,
        "enrollments": shape.enrollments,
        "seed_s": seeded,
        "migrations": applied,
        "migrate_s": migrate_s,
        "bytes": _size_on_disk(url),
    }


def main(args: argparse.Namespace) -> int:
    shape_of = shapes(args.enrollments)
    wall = time.monotonic()
    if not args.database_url:
        where = Path(args.dir or tempfile.gettempdir())
        free = shutil.disk_usage(where).free
        need = args.enrollments * 1000  # about 0.8 KB a seeded enrollment on SQLite
        if free < need:
            raise SystemExit(
                f"{where} has {free / 1e9:.1f} GB free; {args.enrollments:,} enrollments "
                f"need about {need / 1e9:.1f} GB (--dir elsewhere, or fewer --enrollments)"
            )
    with contextlib.ExitStack() as stack:
        tmpdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="enrollment-scale-", dir=args.dir or None)
            )
        )
        urls = stack.enter_context(_databases(args, tmpdir))
        builds, servers = {}, {}
        for name, shape in shape_of.items():
            builds[name] = _build(urls[name], shape)
            b = builds[name]
            print(
                f"{name}: seeded {b['students']:,} students, {b['enrollments']:,} enrollments "
                f"and their events in {b['seed_s']:.0f} s; {b['bytes'] / 1e9:.2f} GB on disk; "
                f"migrate {', '.join(b['migrations'])} in {b['migrate_s']:.2f} s",
                file=sys.stderr,
            )
            servers[name] = procs.enrollment_server(
                free_port(),
                urls[name],
                tmpdir / f"{name}.log",
                threads=ServerConfig().threads,
                workers=1,
                log_level=args.log_level,
            )
        latencies: dict[str, dict[str, list[int]]] = {name: {} for name in shape_of}
        try:
            probes = {}
            for name, server in servers.items():
                server.start()
                probes[name] = Probe(server.address, shape_of[name], 7)
            _round(probes, 20, {name: {} for name in shape_of}, SMALL)  # warm up
            for index in range(args.rounds):
                _round(probes, args.calls, latencies, SMALL if index % 2 == 0 else LARGE)
                print(f"  round {index + 1}/{args.rounds} done", file=sys.stderr)
            for probe in probes.values():
                probe.channel.close()
        finally:
            for server in servers.values():
                server.stop()

    small, large = (_count(builds[n]["enrollments"]) for n in (SMALL, LARGE))
    rows = []
    for call in latencies[SMALL]:
        p_small = percentile(sorted(latencies[SMALL][call]), 0.99) / 1e6
        p_large = percentile(sorted(latencies[LARGE][call]), 0.99) / 1e6
        growth = p_large / p_small if p_small else float("nan")
        rows.append(
            {
                "call": call,
                "p99_ms_small": p_small,
                "p99_ms_large": p_large,
                "growth": growth,
                "verdict": "PASS" if growth <= MAX_GROWTH else "FAIL",
            }
        )
    kind = "sqlite" if not args.database_url else engine.parse(args.database_url).kind
    lines = [
        f"enrollment bench-scale  {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}  "
        f"{kind}; p99 of {args.rounds} x {args.calls} calls of each kind, one at a time, "
        "servers alternating call by call",
        "",
    ]
    for name in (SMALL, LARGE):
        b = builds[name]
        lines.append(
            f"{_count(b['enrollments']):>5} enrollments ({b['students']:,} students, "
            f"{COURSES:,} courses, events {b['students'] + b['enrollments'] + COURSES:,}): "
            f"seed {b['seed_s']:.0f} s, {b['bytes'] / 1e9:.2f} GB on disk, "
            f"migrate {', '.join(b['migrations']) or '(none)'} {b['migrate_s']:.2f} s"
        )
    lines += [
        "",
        f"{'call':32} {'p99 ' + small + ' ms':>11} {'p99 ' + large + ' ms':>11} {'growth':>7}"
        f"  (want <= {MAX_GROWTH}x)",
    ]
    for r in rows:
        lines.append(
            f"{r['call']:32} {r['p99_ms_small']:11.2f} {r['p99_ms_large']:11.2f} "
            f"{r['growth']:6.2f}x  {r['verdict']}"
        )
    lines.append(f"\nwall time {time.monotonic() - wall:.0f} s")
    print("\n".join(lines))
    path = Path(args.json or f"bench/results/scale-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "shapes": {k: vars(v) for k, v in shape_of.items()},
                "builds": builds,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nresults: {path}")
    return 1 if any(r["verdict"] == "FAIL" for r in rows) else 0
