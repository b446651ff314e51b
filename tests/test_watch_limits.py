"""The watcher bounds over gRPC, on a real server: --max-watchers refuses one stream too
many with RESOURCE_EXHAUSTED TOO_MANY_WATCHERS; a stream whose client stops reading
while many events are written ends with RESOURCE_EXHAUSTED WATCHER_TOO_SLOW, naming the
last sequence it delivered, and a stream resumed from there gets every later event."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import watching
from tests.rpc import TIMEOUT, failure
from tests.servers import scrape

QUEUE = 50  # --watch-queue: events held for one stream whose client does not read
STUDENTS = 400
COURSES = 5  # STUDENTS x COURSES enrollment events in batches: far beyond what the
# HTTP/2 windows and the queue hold together


def _stream(address: str, after: int = 0):
    made = watching.channel(address)
    return made, pb_grpc.EnrollmentServiceStub(made).WatchEvents(
        pb.WatchEventsRequest(after_sequence=after)
    )


def test_a_watcher_too_many_is_refused(db_url, server_process):
    server = server_process("--database-url", db_url, "--max-watchers", "2")
    opened = []
    try:
        with watching.channel(server.address) as channel:
            pb_grpc.EnrollmentServiceStub(channel).CreateCourse(
                pb.CreateCourseRequest(code="M", title="M"), timeout=TIMEOUT
            )
        for _ in range(2):
            opened.append(_stream(server.address))
            next(opened[-1][1])  # open: its backlog came
        third = _stream(server.address)
        opened.append(third)
        with pytest.raises(grpc.RpcError) as refused:
            next(third[1])
        got = failure(refused.value)
        assert (got.code, got.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS")
        assert got.metadata == {"max_watchers": "2"}
        # A bound on streams at once: when one ends, another is let in.
        opened[0][1].cancel()
        fourth = _stream(server.address)
        opened.append(fourth)
        for _ in range(50):
            try:
                assert next(fourth[1]).events[0].sequence == 1
                break
            except grpc.RpcError as error:  # the cancelled one may not be gone yet
                assert failure(error).reason == "TOO_MANY_WATCHERS"
                fourth = _stream(server.address)
                opened.append(fourth)
        else:
            raise AssertionError("no stream was let in after one ended")
    finally:
        for made, call in opened:
            call.cancel()
            made.close()


def test_max_watchers_0_turns_watching_off_and_says_so(db_url, server_process):
    # It said "this server already serves 0 WatchEvents streams; retry later": a retry
    # that can never succeed.
    server = server_process("--database-url", db_url, "--max-watchers", "0")
    made, call = _stream(server.address)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
        got = failure(refused.value)
        assert (got.code, got.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS")
        assert got.metadata == {"max_watchers": "0"}
        assert got.message == (
            "this server serves no WatchEvents streams (--max-watchers 0); "
            "read the change feed with ListEvents"
        ), got.message
    finally:
        call.cancel()
        made.close()


def test_a_watcher_that_does_not_read_is_ended_and_resumes(db_url, server_process):
    server = server_process("--database-url", db_url, "--watch-queue", str(QUEUE))
    with watching.channel(server.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        stub.CreateCourse(pb.CreateCourseRequest(code="M", title="M"), timeout=TIMEOUT)
        made, slow = _stream(server.address)
        received = [e.sequence for e in next(slow).events]  # open; then it stops reading
        watching.enroll_many(stub, STUDENTS, COURSES)
        head = stub.ListEvents(pb.ListEventsRequest(page_size=1), timeout=TIMEOUT).head_sequence
        # Now it reads: what was sent or queued before it was ended, then the end.
        with pytest.raises(grpc.RpcError) as ended:
            for response in slow:
                received += [e.sequence for e in response.events]
        made.close()
        got = failure(ended.value)
        assert (got.code, got.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW")
        assert got.metadata == {"last_sequence": str(received[-1])}
        assert received[-1] < head
        made, resumed = _stream(server.address, after=received[-1])
        try:
            for response in resumed:
                received += [e.sequence for e in response.events]
                if received[-1] >= head:
                    break
        finally:
            resumed.cancel()
            made.close()
    assert received == watching.expected(db_url), "every event once, in order"
    assert head == 1 + COURSES + STUDENTS + STUDENTS * COURSES


@pytest.mark.parametrize("ended_by", ["client_cancels", "connection_age"])
def test_a_watcher_ended_too_slow_that_never_reads_holds_its_place_until_grpc_ends_it(
    start_server, caplog, ended_by
):
    # Its stream waited on a write its client never took. The hub then cut it (cancelled
    # its task) 10 s later and stopped counting it, but that freed nothing of grpc's: the
    # call stayed open on the wire with its slot and buffered message, and every 10 s a
    # client could open --max-watchers more, until grpc's own limit refused every call.
    # Now it counts until grpc has ended the call: its client goes away, or
    # --max-connection-age closes its connection.
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    aged = {"max_connection_age": 4.0, "max_connection_age_grace": 1.0}
    live = start_server(
        watch_queue=500,
        max_watchers=1,
        metrics_address="127.0.0.1:0",
        **(aged if ended_by == "connection_age" else {}),
    )
    live.stub.CreateCourse(pb.CreateCourseRequest(code="M", title="M"), timeout=TIMEOUT)
    # A client that takes no more than HTTP/2's first window (64 KiB) without reading:
    # no BDP probes to widen it. The events below are several times that.
    made = grpc.insecure_channel(
        live.address,
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)],
    )
    stuck = pb_grpc.EnrollmentServiceStub(made).WatchEvents(pb.WatchEventsRequest())
    opened = [(made, stuck)]

    def in_flight() -> float:
        return scrape(live.running.metrics_port)[("enrollment_rpcs_in_flight", ())]

    try:
        next(stuck)  # open; then its client reads nothing more
        watching.enroll_many(live.stub, STUDENTS, COURSES)
        hub = live.running.hub
        assert hub is not None
        deadline = time.monotonic() + TIMEOUT
        while hub.watchers and time.monotonic() < deadline:  # until the hub ends it
            time.sleep(0.01)
        assert hub.watchers == 0, "the stream was not ended as too slow"
        if ended_by == "client_cancels":
            time.sleep(12)  # past the 10 s after which it used to be cut
        # Ended but still open on the wire, it holds its place.
        assert in_flight() == 1
        opened.append(_stream(live.address))
        with pytest.raises(grpc.RpcError) as refused:
            next(opened[-1][1])
        assert failure(refused.value).reason == "TOO_MANY_WATCHERS"
        if ended_by == "client_cancels":
            stuck.cancel()
        else:  # the connection is closed under it: the client sees its stream end
            with pytest.raises(grpc.RpcError):
                for _ in stuck:
                    pass
        deadline = time.monotonic() + TIMEOUT
        while in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight() == 0, "grpc's end of the call was not seen"
        assert any(
            "method=WatchEvents code=RESOURCE_EXHAUSTED reason=WATCHER_TOO_SLOW" in r.getMessage()
            for r in caplog.records
        ), "its log line names why it was ended"
        # Its place is free again: a stream resumes and is served.
        opened.append(_stream(live.address, after=1))
        assert next(opened[-1][1]).events[0].sequence == 2
    finally:
        for channel, call in opened:
            call.cancel()
            channel.close()
