"""What the WatchEvents tests share: a channel of its own, a watcher thread that records
what it receives (and when), writers that enroll, update and drop, and the table's
sequences to compare with."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf import field_mask_pb2

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.rpc import TIMEOUT


def channel(address: str) -> grpc.Channel:
    """A channel of its own (no subchannel shared with the test's other channels)."""
    made = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(made).result(timeout=20)
    return made


class Watcher(threading.Thread):
    """One WatchEvents stream read in a thread: `seen` holds every sequence received,
    `arrivals` gets (sequence, monotonic time) as each arrives, `error` the end."""

    def __init__(self, address: str, after_sequence: int = 0, **filters) -> None:
        super().__init__(daemon=True)
        self.channel = channel(address)
        self.filters = filters
        self.seen: list[int] = []
        self.arrivals: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.call = pb_grpc.EnrollmentServiceStub(self.channel).WatchEvents(
            pb.WatchEventsRequest(after_sequence=after_sequence, **filters)
        )

    def run(self) -> None:
        try:
            for response in self.call:
                now = time.monotonic()
                for event in response.events:
                    self.seen.append(event.sequence)
                    self.arrivals.put((event.sequence, now))
        except grpc.RpcError as error:
            self.error = error

    def wait_for(self, sequence: int, timeout: float) -> float:
        """The monotonic time the event `sequence` arrived; fails after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, when = self.arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"event {sequence} did not arrive within {timeout}s (got {self.seen[-5:]})"
                ) from None
            if got >= sequence:
                return when

    def close(self) -> None:
        self.call.cancel()
        self.join(10)
        self.channel.close()


def delivery_times(watcher: Watcher, stub, writes: int = 5) -> list[float]:
    """Write through stub `writes` times; for each, the seconds until the watcher got it."""
    times = []
    for i in range(writes):
        student = stub.CreateStudent(
            pb.CreateStudentRequest(name=f"N{i}", email=f"n{i}-{time.monotonic_ns()}@x.io"),
            timeout=TIMEOUT,
        ).student
        committed = time.monotonic()
        head = stub.ListEvents(pb.ListEventsRequest(student_id=student.id), timeout=TIMEOUT).events[
            -1
        ]
        arrived = watcher.wait_for(head.sequence, timeout=15)
        times.append(max(0.0, arrived - committed))
    return times


def watched(address: str, stub) -> Watcher:
    """A watcher on the server at address whose stream is open (it has received the
    backlog: a course stub creates)."""
    stub.CreateCourse(pb.CreateCourseRequest(code="W", title="W"), timeout=TIMEOUT)
    watcher = Watcher(address)
    watcher.start()
    watcher.wait_for(1, timeout=15)
    return watcher


def wakes_only_while_wanted(
    listener, wakes: threading.Semaphore, commit: Callable[[], None], *, settle: float
) -> None:
    """What both listeners of persistence/notify.py must do, once started (listener.wake
    is wakes.release): no wake-up for another process's commit (commit()) before the
    process has watchers (want(True)); one when they come, for what committed before;
    one per commit while they last; none after the last went (want(False)), once
    `settle` seconds have let the listener see it."""

    def woken(within: float) -> bool:
        return wakes.acquire(timeout=within)

    commit()
    assert not woken(1.0), "woken without watchers"
    listener.want(True)  # the first watcher
    assert woken(5.0), "not woken when watchers came (for what committed before)"
    assert not woken(0.5), "woken with nothing committed"
    commit()
    assert woken(5.0), "another process's commit did not wake it"
    listener.want(False)  # the last watcher went
    time.sleep(settle)
    while woken(0):
        pass
    commit()
    assert not woken(1.0), "woken after the last watcher went"


def write(stub, people, rooms, rng: random.Random) -> None:
    """One round of the writers' mix: enroll (waitlisting when full), now and then a
    course update, then drop. Two writers on one pair: the loser fails, which is fine."""
    s, c = rng.choice(people), rng.choice(rooms)
    try:
        stub.EnrollStudent(
            pb.EnrollStudentRequest(student_id=s, course_id=c, waitlist_if_full=True),
            timeout=TIMEOUT,
        )
        if rng.random() < 0.2:
            stub.UpdateCourse(
                pb.UpdateCourseRequest(
                    course=pb.Course(id=c, title=f"T{rng.random()}"),
                    update_mask=field_mask_pb2.FieldMask(paths=["title"]),
                ),
                timeout=TIMEOUT,
            )
        stub.DropCourse(pb.DropCourseRequest(student_id=s, course_id=c), timeout=TIMEOUT)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise


def writer(addresses: list[str], people, rooms, stop: threading.Event, seed: int) -> None:
    """Write until stop through the first address; when its server is gone (UNAVAILABLE),
    through the next."""
    rng = random.Random(seed)
    for address in addresses:
        made = channel(address)
        stub = pb_grpc.EnrollmentServiceStub(made)
        try:
            while not stop.is_set():
                write(stub, people, rooms, rng)
            return
        except grpc.RpcError:
            continue  # that server is gone: the next one
        finally:
            made.close()


def three_watchers(address: str, people: list[int], rooms: list[int]) -> list[Watcher]:
    """One started watcher per filter kind: a student's, a course's, everything."""
    filters: list[dict[str, int]] = [{"student_id": people[0]}, {"course_id": rooms[1]}, {}]
    watchers = [Watcher(address, **each) for each in filters]
    for w in watchers:
        w.start()
    return watchers


def start_writers(
    addresses: Callable[[int], list[str]],
    people: list[int],
    rooms: list[int],
    stop: threading.Event,
    count: int = 8,
) -> list[threading.Thread]:
    """count writer threads (see writer), the n-th through addresses(n), started."""
    threads = [
        threading.Thread(target=writer, args=(addresses(n), people, rooms, stop, n), daemon=True)
        for n in range(count)
    ]
    for t in threads:
        t.start()
    return threads


def people_and_rooms(stub, *, people: int = 12, rooms: int = 3) -> tuple[list[int], list[int]]:
    """Students and small courses (capacity 2, waitlist 4) for the writers."""
    students = [
        stub.CreateStudent(
            pb.CreateStudentRequest(name=f"P{i}", email=f"p{i}@x.io"), timeout=TIMEOUT
        ).student.id
        for i in range(people)
    ]
    courses = [
        stub.CreateCourse(
            pb.CreateCourseRequest(code=f"R{i}", title="R", capacity=2, waitlist_capacity=4),
            timeout=TIMEOUT,
        ).course.id
        for i in range(rooms)
    ]
    return students, courses


def expected(db_url: str, *, student_id: int = 0, course_id: int = 0) -> list[int]:
    """The sequences in the table a watcher with these filters must get, ascending."""
    where, values = ["1 = 1"], []
    if student_id:
        where.append("student_id = ?")
        values.append(student_id)
    if course_id:
        where.append("course_id = ?")
        values.append(course_id)
    rows = databases.query(
        db_url,
        f"SELECT sequence FROM events WHERE {' AND '.join(where)} ORDER BY sequence",
        tuple(values),
    )
    return [row[0] for row in rows]


def enroll_many(stub, students: int, courses: int) -> None:
    """students x courses enrollment events (after courses + students creations),
    written in one batch a course."""
    rooms = [
        stub.CreateCourse(
            pb.CreateCourseRequest(code=f"C{i}", title="C"), timeout=TIMEOUT
        ).course.id
        for i in range(courses)
    ]
    people = [
        stub.CreateStudent(
            pb.CreateStudentRequest(name=f"S{i}", email=f"s{i}@x.io"), timeout=TIMEOUT
        ).student.id
        for i in range(students)
    ]
    for course in rooms:
        stub.BatchEnrollStudents(
            pb.BatchEnrollStudentsRequest(
                requests=[pb.EnrollStudentRequest(student_id=s, course_id=course) for s in people]
            ),
            timeout=60,
        )
