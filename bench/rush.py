"""`make bench-rush`: registration opens and every student clicks at once.

5,000 students and 50 courses (capacity 30, waitlist 20); every student tries 5 courses
(popular ones more often) with waitlist_if_full, from 64 concurrent grpc.aio callers in
2 processes, on SQLite (one server process) and PostgreSQL (`serve --workers 2`, on a
database made for the run and dropped after it). Beside it, on the same server and
database, the uncontended write mix of `make bench` (callers on disjoint students over
500 unlimited courses) gives the throughput the rush is held to.

Printed: the time until every request was answered, throughput, p50/p99, the outcomes
(enrolled / waitlisted / waitlist full / any other code), the checks that every course
ends exact (counts = rows, enrolled <= capacity, waitlisted <= waitlist, nobody waits
beside a free seat, positions 1..n in join order, every answer = the stored entry and
its event) and PASS/FAIL: rush throughput >= 70% of the write mix's, no UNAVAILABLE or
INTERNAL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from bench import load, measure, procs
from bench.measure import percentile
from bench.seed import Shape, seed
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.servers import free_port

STUDENTS = 5_000
COURSES = 50
CAPACITY = 30
WAITLIST = 20
TRIES = 5
# Courses 1..500 (capacity 0) carry the write mix; the rush's come after them.
MIX_COURSES = 500
# Connections per load process for each server process (see one_database).
CHANNELS_PER_WORKER = 4
MIN_SHARE = 0.70
BAD_CODES = ("UNAVAILABLE", "INTERNAL")
_ENROLLED, _WAITLISTED = 7, 8  # the event types (server/domain/events.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql"
    )
    parser.add_argument(
        "--postgresql-url",
        default=databases.admin_url("postgresql"),
        help="the PostgreSQL server the run's database is made on",
    )
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--coroutines", type=int, default=32, help="callers per process")
    parser.add_argument("--mix-seconds", type=float, default=10.0, help="the write mix's window")
    parser.add_argument("--threads", type=int, default=0, help="server --threads (0: default)")
    parser.add_argument("--log-level", default="INFO", help="the servers' --log-level")
    parser.add_argument("--seed", type=int, default=8, help="of the students' choices")
    parser.add_argument("--json", default="", help="results file (default bench/results/…)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a FAIL")


# ------------------------------------------------------------------ the rush's callers


@dataclass(frozen=True)
class Try:
    student_id: int
    course_id: int


def choices(first_course: int, seed_value: int) -> list[Try]:
    """Every student's 5 distinct courses, popular ones likelier (weight 1/rank, so the
    top few fill in the first seconds), all the tries in one shuffled order."""
    rng = random.Random(seed_value)
    courses = list(range(first_course, first_course + COURSES))
    weights = [1 / rank for rank in range(1, COURSES + 1)]
    tries = []
    for student in range(1, STUDENTS + 1):
        picked: set[int] = set()
        while len(picked) < TRIES:
            picked.add(rng.choices(courses, weights)[0])
        tries.extend(Try(student, course) for course in sorted(picked))
    rng.shuffle(tries)
    return tries


def _outcome(error: grpc.aio.AioRpcError) -> str:
    """The code, and for FAILED_PRECONDITION the ErrorInfo reason."""
    code = error.code().name
    if code != "FAILED_PRECONDITION":
        return code
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return f"{code} {info.reason}"
    return code


async def _rush(address: str, tries: list[Try], coroutines: int, channels: int, conn) -> None:
    async with load.stubs(address, channels) as stubs:
        conn.send("ready")
        start_ns = conn.recv()
        await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        todo = iter(tries)
        # Per try: sent and answered (monotonic ns, comparable across processes), outcome.
        sent, answered, outcomes = array("q"), array("q"), []

        async def caller(stub) -> None:
            for attempt in todo:
                request = pb.EnrollStudentRequest(
                    student_id=attempt.student_id,
                    course_id=attempt.course_id,
                    waitlist_if_full=True,
                )
                t0 = time.monotonic_ns()
                try:
                    reply = await stub.EnrollStudent(request, timeout=60)
                    outcome = pb.EnrollmentState.Name(reply.enrollment.state)
                except grpc.aio.AioRpcError as error:
                    outcome = _outcome(error)
                t1 = time.monotonic_ns()
                sent.append(t0)
                answered.append(t1)
                outcomes.append((attempt.student_id, attempt.course_id, outcome))

        await asyncio.gather(*(caller(stubs[n % channels]) for n in range(coroutines)))
    conn.send((sent.tobytes(), answered.tobytes(), outcomes))


def rush_worker(address: str, tries: list[Try], coroutines: int, channels: int, conn) -> None:
    """Entry point of one rush process: connect, say ready, send its tries, report."""
    asyncio.run(_rush(address, tries, coroutines, channels, conn))
    conn.close()


@dataclass
class RushResult:
    start_ns: int
    seconds: float  # from the common start to the last answer
    sent: list[int]
    answered: list[int]
    outcomes: list[tuple[int, int, str]]
    server_cpu_s: float


def run_rush(
    server: procs.Server, tries: list[Try], processes: int, coroutines: int, channels: int = 1
):
    ctx = mp.get_context("spawn")
    pipes, workers = [], []
    for index in range(processes):
        parent, child = ctx.Pipe()
        share = tries[index::processes]
        worker = ctx.Process(
            target=rush_worker,
            args=(server.address, share, coroutines, channels, child),
            daemon=True,
        )
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    try:
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError(f"a rush process could not reach {server.name}")
        start_ns = time.monotonic_ns() + 500_000_000
        for pipe in pipes:
            pipe.send(start_ns)
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        cpu0 = server.cpu_seconds()
        reports = []
        for pipe in pipes:
            if not pipe.poll(600):
                raise RuntimeError("a rush process did not report")
            reports.append(pipe.recv())
        cpu1 = server.cpu_seconds()
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    sent, answered, outcomes = array("q"), array("q"), []
    for raw_sent, raw_answered, these in reports:
        sent.frombytes(raw_sent)
        answered.frombytes(raw_answered)
        outcomes.extend(these)
    return RushResult(
        start_ns=start_ns,
        seconds=(max(answered) - start_ns) / 1e9,
        sent=list(sent),
        answered=list(answered),
        outcomes=outcomes,
        server_cpu_s=cpu1 - cpu0,
    )


# ------------------------------------------------------------------ the checks


def check(url: str, address: str, first_course: int, result: RushResult) -> list[str]:
    """Every way the courses could end inexact; empty when they are exact."""
    problems: list[str] = []
    courses = range(first_course, first_course + COURSES)
    low, high = first_course, first_course + COURSES - 1
    rows = databases.query(
        url,
        "SELECT id, capacity, waitlist_capacity, enrolled_count, waitlisted_count "
        "FROM courses WHERE id BETWEEN ? AND ? ORDER BY id",
        (low, high),
    )
    entries = databases.query(
        url,
        "SELECT student_id, course_id, state, join_number FROM student_courses "
        "WHERE course_id BETWEEN ? AND ?",
        (low, high),
    )
    state_names = {1: "ENROLLMENT_STATE_ENROLLED", 2: "ENROLLMENT_STATE_WAITLISTED"}
    stored = {(s, c): state_names[state] for s, c, state, _ in entries}
    counted: Counter = Counter((c, state) for _, c, state, _ in entries)
    for course_id, capacity, waitlist, enrolled, waiting in rows:
        if enrolled != counted[(course_id, 1)] or waiting != counted[(course_id, 2)]:
            problems.append(
                f"course {course_id}: counts {enrolled}/{waiting}, rows "
                f"{counted[(course_id, 1)]}/{counted[(course_id, 2)]}"
            )
        if enrolled > capacity or waiting > waitlist:
            problems.append(f"course {course_id}: {enrolled}/{capacity}, {waiting}/{waitlist}")
        if waiting and enrolled < capacity:
            problems.append(f"course {course_id}: {waiting} wait beside a free seat")
    # Every answer is the stored entry, and every stored entry was answered OK.
    answered_ok = {
        (s, c): outcome for s, c, outcome in result.outcomes if outcome.startswith("ENROLLMENT")
    }
    if answered_ok != stored:
        wrong = set(answered_ok.items()) ^ set(stored.items())
        problems.append(f"{len(wrong)} answers differ from the stored entries: {sorted(wrong)[:5]}")
    # The feed holds exactly one ENROLLED or WAITLISTED event per entry.
    events = Counter(
        (t, s, c)
        for t, s, c in databases.query(
            url,
            "SELECT type, student_id, course_id FROM events "
            "WHERE course_id BETWEEN ? AND ? AND type IN (?, ?)",
            (low, high, _ENROLLED, _WAITLISTED),
        )
    )
    expected = Counter(
        (_ENROLLED if state.endswith("ENROLLED") else _WAITLISTED, s, c)
        for (s, c), state in stored.items()
    )
    if events != expected:
        problems.append(
            f"events differ from the changes: {sum((events - expected).values())} extra, "
            f"{sum((expected - events).values())} missing"
        )
    problems += _waitlist_order(address, courses, result)
    return problems


def _waitlist_order(address: str, courses: range, result: RushResult) -> list[str]:
    """Positions run 1..n (ListEnrollments, waitlist order), and an entry answered before
    another was even sent stands ahead of it."""
    problems = []
    times = {
        (s, c): (t0, t1)
        for (s, c, _), t0, t1 in zip(result.outcomes, result.sent, result.answered, strict=True)
    }
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        for course_id in courses:
            line = stub.ListEnrollments(
                pb.ListEnrollmentsRequest(
                    course_id=course_id,
                    state=pb.ENROLLMENT_STATE_WAITLISTED,
                    page_size=1000,
                )
            ).enrollments
            positions = [e.waitlist_position for e in line]
            if positions != list(range(1, len(line) + 1)):
                problems.append(f"course {course_id}: waitlist positions {positions}")
            for ahead, behind in zip(line, line[1:], strict=False):
                sent_ahead, _ = times[(ahead.student_id, course_id)]
                _, answered_behind = times[(behind.student_id, course_id)]
                if answered_behind < sent_ahead:
                    problems.append(
                        f"course {course_id}: student {behind.student_id} stands behind "
                        f"{ahead.student_id} but was answered before that one was sent"
                    )
    return problems


# ------------------------------------------------------------------ one database


@contextlib.contextmanager
def _database(kind: str, args: argparse.Namespace, tmpdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmpdir / 'rush.db'}"
        return
    server = databases.Server(kind, args.postgresql_url)
    url = server.create(prefix="enrollment_rush")
    try:
        yield url
    finally:
        server.drop(url)


def _create_courses(address: str) -> int:
    """The rush's 50 courses, made over gRPC (so their COURSE_CREATED events are real);
    the id of the first."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        ids = [
            stub.CreateCourse(
                pb.CreateCourseRequest(
                    code=f"RUSH-{n}",
                    title=f"Popular section {n}",
                    capacity=CAPACITY,
                    waitlist_capacity=WAITLIST,
                )
            ).course.id
            for n in range(1, COURSES + 1)
        ]
    if ids != list(range(ids[0], ids[0] + COURSES)):
        raise RuntimeError(f"the rush's course ids are not consecutive: {ids}")
    return ids[0]


def one_database(kind: str, args: argparse.Namespace, tmpdir: Path) -> dict:
    workers = 1 if kind == "sqlite" else 2
    # SO_REUSEPORT spreads connections, not calls, over the workers: with one connection
    # per load process, both could land on one worker, and the rush or the write mix
    # then runs on half the server (PostgreSQL's rush came out near 500 or near 800
    # calls/s by that luck: bench/PROFILE.md, "ninth session").
    channels = 1 if workers == 1 else CHANNELS_PER_WORKER * workers
    mix_shape = Shape(students=STUDENTS, courses=MIX_COURSES, per_student=0)
    with _database(kind, args, tmpdir) as url:
        procs.migrate(url)
        seed(url, mix_shape)
        if kind == "postgresql":
            procs.migrate(url)  # moves the id sequences past the seeded ids
        server = procs.enrollment_server(
            free_port(),
            url,
            tmpdir / f"{kind}.log",
            threads=args.threads or _default_threads(),
            workers=workers,
            log_level=args.log_level,
        )
        server.start()
        try:
            first = _create_courses(server.address)
            mix = measure.drive(
                server,
                "write",
                mix_shape,
                processes=args.processes,
                coroutines=args.coroutines,
                duration=args.mix_seconds,
                warmup=2.0,
                channels=channels,
            )
            result = run_rush(
                server, choices(first, args.seed), args.processes, args.coroutines, channels
            )
            problems = check(url, server.address, first, result)
        finally:
            server.stop()
    return _summary(kind, workers, mix, result, problems)


def _default_threads() -> int:
    from enrollment.server.startup.config import ServerConfig

    return ServerConfig().threads


def _summary(kind: str, workers: int, mix, result: RushResult, problems: list[str]) -> dict:
    latencies = sorted(t1 - t0 for t0, t1 in zip(result.sent, result.answered, strict=True))
    outcomes = Counter(outcome for _, _, outcome in result.outcomes)
    calls = len(result.outcomes)
    rush_rate = calls / result.seconds
    share = rush_rate / mix.calls_per_s
    # The fill: until the last seat or waitlist place was taken, when the hot rows are
    # written (afterwards every try is turned away).
    last_taken = max(
        (t1 for (_, _, outcome), t1 in zip(result.outcomes, result.answered, strict=True)
         if outcome.startswith("ENROLLMENT")),
        default=result.start_ns,
    )  # fmt: skip
    fill_calls = sum(1 for t1 in result.answered if t1 <= last_taken)
    fill_seconds = (last_taken - result.start_ns) / 1e9
    bad = {code: n for code, n in outcomes.items() if code in BAD_CODES}
    bad.update({code: n for code, n in mix.codes.items() if code in BAD_CODES})
    return {
        "database": kind,
        "workers": workers,
        "rush": {
            "calls": calls,
            "seconds": result.seconds,
            "calls_per_s": rush_rate,
            "p50_ms": percentile(latencies, 0.50) / 1e6,
            "p99_ms": percentile(latencies, 0.99) / 1e6,
            "server_cpu_us_per_call": result.server_cpu_s / calls * 1e6,
            "outcomes": dict(outcomes),
            "fill_calls": fill_calls,
            "fill_seconds": fill_seconds,
            "fill_calls_per_s": fill_calls / fill_seconds if fill_seconds else float("nan"),
        },
        "write_mix": {
            "calls_per_s": mix.calls_per_s,
            "p50_ms": mix.p50_ms,
            "p99_ms": mix.p99_ms,
            "server_cpu_us_per_call": mix.server_cpu_us_per_call,
            "codes": mix.codes,
        },
        "share": share,
        "bad_codes": bad,
        "problems": problems,
        "verdict": "PASS" if share >= MIN_SHARE and not bad and not problems else "FAIL",
    }


_LABELS = {
    "ENROLLMENT_STATE_ENROLLED": "enrolled",
    "ENROLLMENT_STATE_WAITLISTED": "waitlisted",
    "FAILED_PRECONDITION WAITLIST_FULL": "waitlist full",
    "FAILED_PRECONDITION COURSE_FULL": "course full",
}


def render(results: list[dict], commit: str) -> str:
    lines = [
        f"enrollment bench-rush  {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}  "
        f"commit {commit}",
        f"{STUDENTS:,} students x {TRIES} tries (waitlist_if_full) over {COURSES} courses "
        f"(capacity {CAPACITY}, waitlist {WAITLIST}), 64 callers; write mix: "
        f"EnrollStudent+DropCourse on disjoint students over {MIX_COURSES} courses",
    ]
    for r in results:
        rush, mix = r["rush"], r["write_mix"]
        outcomes = ", ".join(
            f"{_LABELS.get(code, code)} {n:,}" for code, n in sorted(rush["outcomes"].items())
        )
        lines += [
            "",
            f"{r['database']} (serve --workers {r['workers']})",
            f"  rush      {rush['calls']:,} calls answered in {rush['seconds']:.2f} s: "
            f"{rush['calls_per_s']:7.0f} calls/s  p50 {rush['p50_ms']:6.1f} ms  "
            f"p99 {rush['p99_ms']:6.1f} ms  "
            f"server CPU {rush['server_cpu_us_per_call']:.0f} us/call",
            f"  fill      the last seat/waitlist place taken after {rush['fill_seconds']:.2f} s, "
            f"{rush['fill_calls']:,} calls answered by then: {rush['fill_calls_per_s']:.0f} "
            f"calls/s ({rush['fill_calls_per_s'] / mix['calls_per_s']:.0%} of the write mix)",
            f"  write mix {mix['calls_per_s']:7.0f} calls/s  p50 {mix['p50_ms']:6.1f} ms  "
            f"p99 {mix['p99_ms']:6.1f} ms  "
            f"server CPU {mix['server_cpu_us_per_call']:.0f} us/call",
            f"  outcomes  {outcomes}",
            "  courses   exact: counts = rows, enrolled <= 30, waitlist <= 20 in join order, "
            "answers = entries = events"
            if not r["problems"]
            else "  courses   NOT exact:\n    " + "\n    ".join(r["problems"][:20]),
            f"  target    rush {r['share']:.0%} of the write mix's throughput (want >= "
            f"{MIN_SHARE:.0%}), UNAVAILABLE/INTERNAL {sum(r['bad_codes'].values())}  "
            f"{r['verdict']}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rush", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("sqlite", "postgresql"):
            raise SystemExit(f"unknown database {kind!r}: sqlite or postgresql")
    results = []
    with tempfile.TemporaryDirectory(prefix="enrollment-rush-") as tmp:
        for kind in kinds:
            results.append(one_database(kind, args, Path(tmp)))
            print(f"{kind} done", file=sys.stderr)
    from bench.run import _git_commit

    commit = _git_commit()
    print(render(results, commit))
    path = Path(args.json or f"bench/results/rush-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"commit": commit, "results": results}, indent=1) + "\n")
    print(f"\nresults: {path}")
    failed = any(r["verdict"] == "FAIL" for r in results)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
