"""A watcher's server dies (kill -9) mid-stream: it resumes from the last sequence it
received on another server process sharing the database, and in the end has every
matching event of the table exactly once, in order. Two server processes, 8 writer
connections through both (those of the killed one carry on through the other), one
watcher per filter kind on the one that is killed."""

from __future__ import annotations

import signal
import threading
import time

import grpc

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import watching
from tests.rpc import TIMEOUT
from tests.watching import Watcher


def _wait_for_events(watchers: list[Watcher], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not all(w.seen for w in watchers):
        assert time.monotonic() < deadline, [len(w.seen) for w in watchers]
        time.sleep(0.05)


def test_a_watcher_resumes_on_another_process_after_kill_9(db_url, server_process):
    doomed = server_process("--database-url", db_url)
    other = server_process("--database-url", db_url)
    with watching.channel(other.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        people, rooms = watching.people_and_rooms(stub)
        watchers = watching.three_watchers(doomed.address, people, rooms)
        stop = threading.Event()
        # Half start on the doomed process and go on through the other.
        pair = [doomed.address, other.address]
        writers = watching.start_writers(lambda n: pair[:: 1 if n % 2 else -1], people, rooms, stop)
        time.sleep(2)
        _wait_for_events(watchers)
        doomed.proc.send_signal(signal.SIGKILL)  # mid-stream, mid-write
        doomed.wait(10)
        resumed = []
        for w in watchers:
            w.join(10)
            assert w.error is not None and w.error.code() == grpc.StatusCode.UNAVAILABLE
            again = Watcher(other.address, after_sequence=w.seen[-1], **w.filters)
            again.start()
            resumed.append(again)
        time.sleep(2)  # the writers go on through the other process
        stop.set()
        for w in writers:
            w.join(30)
        head = stub.ListEvents(pb.ListEventsRequest(page_size=1), timeout=TIMEOUT).head_sequence
        resumed[-1].wait_for(head, timeout=10)  # the unfiltered one gets the last event
        time.sleep(1.5)  # the contract: within 1 s of the commit
        for w in resumed:
            w.close()
        for w in watchers:
            w.channel.close()
    for before, after in zip(watchers, resumed, strict=True):
        expected = watching.expected(db_url, **before.filters)
        got = before.seen + after.seen
        assert before.seen and after.seen, (before.filters, len(before.seen), len(after.seen))
        assert got == expected, (before.filters, len(got), len(expected))
