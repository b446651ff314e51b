"""The change feed from the client side: iter_events (walk, filters, follow across a
server restart without losing or repeating an event) and `enrollment-client events`."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
import time
from concurrent import futures

import grpc

from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb
from tests import servers
from tests.certs import Authority
from tests.client_cli import CLIENT, _env, ok
from tests.rpc import TIMEOUT, new_course, new_student


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
    assert rows[1]["enrollment"]["studentId"] == str(student.id)


def test_follow_survives_a_server_restart_without_losing_or_repeating(db_url, tmp_path):
    port = servers.free_port()

    def serve(n: int):
        return servers.start(tmp_path / f"server{n}.log", "--database-url", db_url, port=port)

    server = serve(1)
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
        server.stop()
        time.sleep(0.5)  # the follower meets UNAVAILABLE meanwhile
        server = serve(2)
        create(5, 5)
        deadline = time.monotonic() + 20
        while len(seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        create(1, 10)  # wakes the follower so it returns
        follower.join(10)
    finally:
        server.stop()
    assert seen[:10] == list(range(1, 11))


def test_the_async_client_walks_and_follows_the_feed(live):
    from enrollment.client.aio import AsyncEnrollmentClient

    people = [new_student(live.stub) for _ in range(3)]

    async def scenario():
        async with AsyncEnrollmentClient(live.address) as client:
            walked = [e.student.id async for e in client.iter_events(page_size=2)]
            followed: list[int] = []

            async def follow():
                async for event in client.iter_events(follow=True, poll_interval=0.1):
                    followed.append(event.student.id)
                    if len(followed) == 4:
                        return

            task = asyncio.create_task(follow())
            await asyncio.sleep(0.3)
            late = await asyncio.get_running_loop().run_in_executor(None, new_student, live.stub)
            await asyncio.wait_for(task, 10)
            return walked, followed, late

    walked, followed, late = asyncio.run(scenario())
    assert walked == [p.id for p in people]
    assert followed == [*walked, late.id]


def test_follow_polls_list_events_on_a_server_that_serves_no_watchers(db_url, server_process):
    # With --max-watchers 0 the server refuses every WatchEvents stream with
    # RESOURCE_EXHAUSTED TOO_MANY_WATCHERS; follow raised it instead of reading the feed
    # with ListEvents, as it does on a server without WatchEvents.
    from enrollment.client.aio import AsyncEnrollmentClient

    server = server_process("--database-url", db_url, "--max-watchers", "0")
    with EnrollmentClient(server.address) as client:
        first = client.create_student("Ada Lovelace", "ada@example.com")
        followed = client.iter_events(follow=True, poll_interval=0.05)
        assert next(followed).student.id == first.id
        second = client.create_student("Alan Turing", "alan@example.com")
        assert next(followed).student.id == second.id

    async def scenario():
        async with AsyncEnrollmentClient(server.address) as client:
            stream = client.iter_events(follow=True, poll_interval=0.05)
            return [(await stream.__anext__()).sequence for _ in range(2)]

    assert asyncio.run(scenario()) == [1, 2]


class _Follower:
    """`enrollment-client events --follow` in the background, its stdout and stderr
    lines in queues as they come."""

    def __init__(self, address: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [str(CLIENT), "--address", address, "--timeout", "2", *extra, "events", "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream, lines: queue.Queue[str]) -> None:
        for line in stream:
            lines.put(line)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_follow_says_once_an_outage_that_it_is_retrying_and_when_the_server_is_back(
    db_url, tmp_path
):
    # With the server down it retried forever without a word: a wrong port looked
    # like a quiet feed.
    port = servers.free_port()
    address = f"127.0.0.1:{port}"
    down = f"enrollment-client: cannot reach the server at {address}, retrying: UNAVAILABLE"
    back = f"enrollment-client: reached the server at {address}, following\n"
    follower = _Follower(address)
    try:
        for n in (1, 2):  # not reached from the start, then lost after a restart
            assert follower.err.get(timeout=20).startswith(down)
            time.sleep(3)  # attempts a second apart: said once, not per attempt
            assert follower.err.empty()
            server = servers.start(tmp_path / f"server{n}.log", "--database-url", db_url, port=port)
            try:
                assert follower.err.get(timeout=20) == back
                with EnrollmentClient(address) as client:
                    client.create_student(f"S{n}", f"s{n}@example.com")
                line = follower.out.get(timeout=20)
                assert line.split()[0] == str(n) and "STUDENT_CREATED" in line, line
            finally:
                server.stop()
        assert follower.err.get(timeout=20).startswith(down)  # the last stop's outage
    finally:
        follower.stop()
    assert follower.out.empty() and follower.err.empty()


def test_follow_over_tls_to_a_plaintext_server_says_why_it_cannot_reach_it(live, tmp_path):
    ca = Authority(tmp_path / "pki", "test-ca")
    follower = _Follower(live.address, "--tls-ca", str(ca.ca_file))
    try:
        said = follower.err.get(timeout=20)
        assert "(the server may not speak TLS: connect without --tls-ca" in said, said
        time.sleep(2.5)
    finally:
        follower.stop()
    assert follower.out.empty() and follower.err.empty()


def test_both_clients_tell_a_follower_of_an_outage_once_and_of_its_end(db_url, tmp_path):
    from enrollment.client.aio import AsyncEnrollmentClient

    port = servers.free_port()
    address = f"127.0.0.1:{port}"
    told: dict[str, list[str]] = {"sync": [], "async": []}
    seen: dict[str, list[int]] = {"sync": [], "async": []}

    def tell(who: str):
        def on_outage(error: ClientError | None) -> None:
            told[who].append("back" if error is None else error.code)

        return on_outage

    def follow_sync() -> None:
        with EnrollmentClient(address, timeout=2) as client:
            for event in client.iter_events(follow=True, poll_interval=0.1, on_outage=tell("sync")):
                seen["sync"].append(event.sequence)
                return

    async def follow_async() -> None:
        async with AsyncEnrollmentClient(address, timeout=2) as client:
            async for event in client.iter_events(
                follow=True, poll_interval=0.1, on_outage=tell("async")
            ):
                seen["async"].append(event.sequence)
                return

    followers = [
        threading.Thread(target=follow_sync, daemon=True),
        threading.Thread(target=lambda: asyncio.run(follow_async()), daemon=True),
    ]
    for follower in followers:
        follower.start()
    time.sleep(2)  # many attempts 0.1 s apart
    assert told == {"sync": ["UNAVAILABLE"], "async": ["UNAVAILABLE"]}
    server = servers.start(tmp_path / "server.log", "--database-url", db_url, port=port)
    try:
        with EnrollmentClient(address) as client:
            client.create_student("S", "s@example.com")
        for follower in followers:
            follower.join(20)
    finally:
        server.stop()
    assert seen == {"sync": [1], "async": [1]}
    assert told == {"sync": ["UNAVAILABLE", "back"], "async": ["UNAVAILABLE", "back"]}


def test_follow_resumes_after_a_stream_the_server_cancelled():
    # grpc's server cancels the streams it has taken in but not yet handed to the
    # service when it stops, and those still running at the end of the grace: a
    # follower got CANCELLED, a cancel it never made, and its follow ended with that
    # error at a restart.
    attempts = []

    def list_events(request, context):
        return pb.ListEventsResponse(head_sequence=0)

    def watch_events(request, context):
        attempts.append(request.after_sequence)
        if len(attempts) == 1:  # before any event: the channel's retry
            context.abort(grpc.StatusCode.CANCELLED, "Cancelled")
        sequence = len(attempts) - 1
        yield pb.WatchEventsResponse(events=[pb.Event(sequence=sequence, student_id=7)])
        if len(attempts) == 2:  # after an event: the follow resumes after it
            context.abort(grpc.StatusCode.CANCELLED, "Cancelled")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handlers = {
        "ListEvents": grpc.unary_unary_rpc_method_handler(
            list_events,
            request_deserializer=pb.ListEventsRequest.FromString,
            response_serializer=pb.ListEventsResponse.SerializeToString,
        ),
        "WatchEvents": grpc.unary_stream_rpc_method_handler(
            watch_events,
            request_deserializer=pb.WatchEventsRequest.FromString,
            response_serializer=pb.WatchEventsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("enrollment.v1.EnrollmentService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with EnrollmentClient(f"127.0.0.1:{port}") as client:
            followed = client.iter_events(follow=True, poll_interval=0.05)
            assert [next(followed).sequence for _ in range(2)] == [1, 2]
        assert attempts == [0, 0, 1]
    finally:
        server.stop(None)
