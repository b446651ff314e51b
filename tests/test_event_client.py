"""The change feed from the client side: iter_events (walk, filters, follow across a
server restart without losing or repeating an event) and `enrollment-client events`."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import grpc

from enrollment.client.api import EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb
from tests.rpc import SERVER, TIMEOUT, free_port, new_course, new_student
from tests.test_client import ok


def test_iter_events_walks_every_page_and_filters(live):
    people = [new_student(live.stub) for _ in range(7)]
    course = new_course(live.stub)
    with EnrollmentClient(live.address) as client:
        walked = list(client.iter_events(page_size=3))
        assert [e.student.id for e in walked[:7]] == [p.id for p in people]
        assert [e.sequence for e in walked] == sorted({e.sequence for e in walked})
        assert [e.type for e in client.iter_events(course_id=course.id)] == [
            pb.EVENT_TYPE_COURSE_CREATED
        ]
        assert list(client.iter_events(after=walked[-1].sequence)) == []


def test_the_cli_prints_one_line_per_event(live):
    student = new_student(live.stub)
    course = new_course(live.stub)
    live.stub.EnrollStudent(
        pb.EnrollStudentRequest(student_id=student.id, course_id=course.id), timeout=TIMEOUT
    )
    lines = ok(live, "events", "--course", str(course.id)).splitlines()
    assert [line.split()[2:] for line in lines] == [
        ["COURSE_CREATED", f"course={course.id}"],
        ["ENROLLED", f"student={student.id}", f"course={course.id}", "state=ENROLLED"],
    ]
    rows = [json.loads(line) for line in ok(live, "--json", "events", "--after", "1").splitlines()]
    assert [r["type"] for r in rows] == ["EVENT_TYPE_COURSE_CREATED", "EVENT_TYPE_ENROLLED"]
    assert rows[1]["enrollment"]["student_id"] == str(student.id)


def _serve(url: str, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [SERVER, "serve", "--address", f"127.0.0.1:{port}", "--database-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=20)
    channel.close()
    return process


def test_follow_survives_a_server_restart_without_losing_or_repeating(db_url):
    port = free_port()
    server = _serve(db_url, port)
    seen: list[int] = []
    stop = threading.Event()

    def follow():
        with EnrollmentClient(f"127.0.0.1:{port}", timeout=2) as client:
            for event in client.iter_events(follow=True, poll_interval=0.1):
                seen.append(event.sequence)
                if stop.is_set():
                    return

    def create(count: int, start: int) -> None:
        with EnrollmentClient(f"127.0.0.1:{port}") as client:
            for n in range(start, start + count):
                client.create_student(f"S{n}", f"s{n}@example.com")

    follower = threading.Thread(target=follow, daemon=True)
    try:
        create(5, 0)
        follower.start()
        time.sleep(0.5)
        server.terminate()
        server.wait(20)
        time.sleep(0.5)  # the follower meets UNAVAILABLE meanwhile
        server = _serve(db_url, port)
        create(5, 5)
        deadline = time.monotonic() + 20
        while len(seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        create(1, 10)  # wakes the follower so it returns
        follower.join(10)
    finally:
        server.terminate()
        server.wait(20)
    assert seen[:10] == list(range(1, 11))
