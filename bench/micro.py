"""`python -m bench micro`: CPU per call of the servicer in-process, one thread, no gRPC.

The figure each server-side optimisation was judged by: unlike `make bench`, it hardly
moves with the load on a shared machine, and it shows what the code costs before
threads, the GIL and the network multiply it. A second table measures the parts whose
savings code comments cite (bench/PROFILE.md, "Figures behind code comments").

Two rows of the first table measure what the server does not do, for bench/PROFILE.md:
the write pair with SQLite's synchronous=NORMAL (no fsync at each commit), and with 8
pairs in one transaction (what group commit would save), with and without the feed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from bench import procs
from bench.nofeed import without_feed
from bench.seed import Shape, seed
from enrollment.server.domain import events, lookups
from enrollment.server.domain.enrollments import Entry
from enrollment.server.domain.updates import etag_of
from enrollment.server.operations import logs
from enrollment.server.persistence import engine, models, unit_of_work
from enrollment.server.persistence.models import Student
from enrollment.server.transport import convert
from enrollment.server.transport.interceptors import RequestReads
from enrollment.server.transport.servicer import EnrollmentServicer
from enrollment.v1 import enrollment_pb2 as pb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=3000)


def _cpu_us(fn, calls: int, repeats: int = 7) -> float:
    """The least CPU per call over several batches: other load only ever adds to it."""

    def run(count: int) -> None:
        for _ in range(count):
            fn()

    return _least_per_call(run, calls, repeats)


def _least_per_call(run: Callable[[int], object], calls: int, repeats: int = 7) -> float:
    """run(n) makes n calls; the least CPU per call of several batches, after a warm-up."""
    run(min(200, calls))
    batch = max(1, calls // repeats)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run(batch)
        best = min(best, (time.process_time() - start) / batch * 1e6)
    return best


def _parts() -> dict:
    """What server/transport/convert.py, server/persistence/prepared.py, models.utcnow
    and the event payload's encoder (domain/events.py) say they save."""
    when = dt.datetime(2026, 1, 1, 12, 0, 0, 123456)
    # An ENROLLED event's payload: the entry and the course after, as events.py makes them.
    stamp = when.isoformat()
    payload = {
        "enrollment": {"student_id": 1, "course_id": 2, "state": 1, "waitlist_position": 0,
                       "create_time": stamp, "enroll_time": stamp},
        "course": {"id": 2, "code": "CS-101", "title": "Intro", "capacity": 30,
                   "enrolled_count": 7, "waitlist_capacity": 5, "waitlisted_count": 0,
                   "create_time": stamp, "update_time": stamp, "version": 3},
    }  # fmt: skip
    _encode = json.JSONEncoder(separators=(",", ":")).encode
    # The same payload as events.py writes it: the entry's and the course's templates.
    entry = Entry(student_id=1, course_id=2, state=1, waitlist_position=0, create_time=when,
                  enroll_time=when)  # fmt: skip
    # A course row as a page hands it to convert.course_to_proto, and as the snapshot reads it.
    course = SimpleNamespace(
        id=2, code="CS-101", title="Intro", capacity=30, enrolled_count=7, create_time=when,
        waitlist_capacity=5, waitlisted_count=0, update_time=when, version=3,
    )  # fmt: skip

    def event_json() -> str:
        head = f'{{"enrollment":{events._entry(entry)},"course":'
        return f"{head}{events._course(course, course.enrolled_count, course.waitlisted_count)}}}"

    def event_dicts() -> str:
        # As events.py made it before 2026-12-01's seventh session: the snapshots as
        # dicts of the same rows (their times through isoformat), then one encoder.
        row = course
        return _encode(
            {
                "enrollment": {
                    "student_id": entry.student_id, "course_id": entry.course_id,
                    "state": entry.state, "waitlist_position": entry.waitlist_position,
                    "create_time": entry.create_time.isoformat(),
                    "enroll_time": entry.enroll_time.isoformat() if entry.enroll_time else None,
                },
                "course": {
                    "id": row.id, "code": row.code, "title": row.title, "capacity": row.capacity,
                    "enrolled_count": row.enrolled_count,
                    "waitlist_capacity": row.waitlist_capacity,
                    "waitlisted_count": row.waitlisted_count,
                    "create_time": row.create_time.isoformat(),
                    "update_time": (row.update_time or row.create_time).isoformat(),
                    "version": row.version,
                },
            }
        )  # fmt: skip

    assert event_dicts() == event_json()

    assert json.loads(event_json()) == payload

    def course_with_timestamps() -> pb.Course:
        # course_to_proto as it was before 2026-11-30's sixth session: Timestamps copied in.
        return pb.Course(
            id=course.id, code=course.code, title=course.title, capacity=course.capacity,
            enrolled_count=course.enrolled_count, create_time=convert.timestamp(course.create_time),
            waitlist_capacity=course.waitlist_capacity, waitlisted_count=course.waitlisted_count,
            update_time=convert.timestamp(course.update_time), etag=etag_of(course.version),
        )  # fmt: skip

    return {
        "Timestamp.FromDatetime": lambda: Timestamp().FromDatetime(when),
        "convert.timestamp": lambda: convert.timestamp(when),
        "a Course, Timestamps copied in": course_with_timestamps,
        "a Course, as used": lambda: convert.course_to_proto(course),
        "peewee compiles a lookup's SQL": lambda: Student.select().where(Student.id == 1).sql(),
        "the lookup, SQL prepared once": lambda: lookups.find_student(1),
        "utcnow(), now().replace()": models._utcnow,
        "utcnow() as used": models.utcnow,
        "event JSON, JSONEncoder.encode": lambda: _encode(payload),
        "event snapshots + JSON, dicts": event_dicts,
        "event snapshots + JSON, as used": event_json,
    }


class _Arrived:
    """A call whose request message is already there, as a unary call's mostly is."""

    async def read(self) -> object:
        return self


def _request_reads(calls: int) -> dict[str, float]:
    """CPU per read of a call's request message, bounded by asyncio.timeout() per call
    and by RequestReads (server/transport/interceptors.py), best of 7 batches."""
    context, reads = _Arrived(), RequestReads(30.0)

    async def one_timer_per_call() -> None:
        async with asyncio.timeout(30.0):
            await context.read()

    async def bounded_reads() -> None:
        await reads.read(context)

    loop = asyncio.new_event_loop()

    def batches(read: Callable[[], Any]) -> Callable[[int], object]:
        async def reads_in_a_task(count: int) -> None:
            for _ in range(count):
                await read()

        return lambda count: loop.run_until_complete(reads_in_a_task(count))

    try:
        return {
            "request read, asyncio.timeout": _least_per_call(batches(one_timer_per_call), calls),
            "request read, as used": _least_per_call(batches(bounded_reads), calls),
        }
    finally:
        loop.close()


def _log_lines(calls: int) -> dict[str, float]:
    """A call's log line as the server writes it (operations/logs.py, setup("INFO") with
    its stream on /dev/null) against logging's own way (Logger.info), at the end: it
    sets up this process's logging."""
    logs.setup("INFO")
    logger = logging.getLogger("enrollment.rpc")
    args = ("GetStudent", "OK", "-", 1.25, "ipv4:127.0.0.1:50000", "-", os.urandom(16).hex())
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    with open(os.devnull, "w") as devnull:
        handler.setStream(devnull)
        try:
            return {
                "log line, Logger.info": _cpu_us(
                    lambda: logger.info(logs.RPC_MESSAGE, *args, extra=None), calls
                ),
                "log line, as used": _cpu_us(lambda: logs.rpc(logger, args, None), calls),
            }
        finally:
            handler.setStream(sys.stderr)


def _empty_read() -> None:
    """A unit of work of no statement: what taking its connection costs."""
    with unit_of_work.unit_of_work(write=False, snapshot=False):
        pass


def workload(shape: Shape, rng: random.Random) -> dict[str, Callable[[], object]]:
    """The calls measured, by name, each a servicer call in-process (the database is the
    one engine.open_pool opened); rng picks the rows, so a seed repeats the same ones."""
    servicer = EnrollmentServicer()

    def student() -> int:
        return rng.randint(1, shape.students)

    def request_id() -> str:
        # As the client sends them (their records are on the write path), from rng.
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def enroll_and_drop() -> None:
        who = student()
        taken = shape.enrolled(who)
        course = rng.randint(1, shape.courses)
        while course in taken:
            course = rng.randint(1, shape.courses)
        servicer.EnrollStudent(
            pb.EnrollStudentRequest(student_id=who, course_id=course, request_id=request_id()),
            None,
        )
        servicer.DropCourse(
            pb.DropCourseRequest(student_id=who, course_id=course, request_id=request_id()),
            None,
        )

    return {
        "GetStudent": lambda: servicer.GetStudent(pb.GetStudentRequest(student_id=student()), None),
        "ListCourses of a student": lambda: servicer.ListCourses(
            pb.ListCoursesRequest(student_id=student()), None
        ),
        "ListStudents, a roster": lambda: servicer.ListStudents(
            pb.ListStudentsRequest(course_id=rng.randint(1, shape.courses)), None
        ),
        "EnrollStudent + DropCourse": enroll_and_drop,
    }


def _one_commit(db, call: Callable[[], object], count: int) -> None:
    """count calls in one transaction: each call's unit of work is a savepoint in it."""
    with db.atomic("IMMEDIATE"):
        for _ in range(count):
            call()


def main(args: argparse.Namespace) -> int:
    shape = Shape()
    calls = workload(shape, random.Random(1))
    enroll_and_drop = calls["EnrollStudent + DropCourse"]
    with tempfile.TemporaryDirectory(prefix="enrollment-micro-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        procs.migrate(url)
        seed(url, shape)
        db = engine.open_pool(url, max_connections=4)
        try:
            print(f"{'call':30} {'CPU us/call':>11}   (in-process, one thread, best of 7 batches)")
            # As the server's SQLite threads run them: keeping their connection.
            with unit_of_work.connection_kept():
                for name, fn in calls.items():
                    n = args.calls // 4 if "Enroll" in name else args.calls
                    print(f"{name:30} {_cpu_us(fn, n):11.0f}")
                # What the change feed's outbox costs the write pair (bench/nofeed.py).
                with without_feed():
                    us = _cpu_us(enroll_and_drop, args.calls // 4)
                print(f"{'  the same, no change feed':30} {us:11.0f}")
                # What the server does not do, for bench/PROFILE.md: the commit's fsync
                # (synchronous=NORMAL syncs the WAL only at checkpoints), and one commit
                # for several calls (group commit: 8 pairs in one transaction, each
                # call's unit of work a savepoint in it).
                db.execute_sql("PRAGMA synchronous = NORMAL")
                try:
                    us = _cpu_us(enroll_and_drop, args.calls // 4)
                finally:
                    db.execute_sql(f"PRAGMA synchronous = {engine.SQLITE_PRAGMAS['synchronous']}")
                print(f"{'  synchronous=NORMAL (unused)':30} {us:11.0f}")
                us = _cpu_us(lambda: _one_commit(db, enroll_and_drop, 8), args.calls // 32) / 8
                print(f"{'  8 pairs a commit (unused)':30} {us:11.0f}")
                with without_feed():
                    us = _cpu_us(lambda: _one_commit(db, enroll_and_drop, 8), args.calls // 32)
                print(f"{'    the same, no change feed':30} {us / 8:11.0f}")
            print(f"\n{'part, cited in code comments':30} {'CPU us/call':>11}")
            with db.connection_context():
                for name, fn in _parts().items():
                    print(f"{name:30} {_cpu_us(fn, args.calls):11.1f}")
            for name, us in _request_reads(args.calls).items():
                print(f"{name:30} {us:11.1f}")
            us = _cpu_us(_empty_read, args.calls)
            print(f"{'empty read, pooled connection':30} {us:11.1f}")
            with unit_of_work.connection_kept():
                us = _cpu_us(_empty_read, args.calls)
            print(f"{'empty read, kept connection':30} {us:11.1f}")
            for name, us in _log_lines(args.calls).items():
                print(f"{name:30} {us:11.1f}")
        finally:
            engine.close_pool()
    return 0
