"""The database goes away for a few seconds under a process with a watcher: every part
that keeps trying (the watch poller, the change-feed listener or looks, the purgers,
SQLite's checkpointer) says so once when its failures start and once when it works
again, not once per retry. At 3 a.m. an
outage of a minute must be two lines a part, not hundreds."""

from __future__ import annotations

import collections
import logging
import time

import grpc
import pytest

from enrollment.server.errors import DatabaseUnavailable
from enrollment.server.persistence.checkpoint import Checkpointer
from enrollment.server.startup.purging import Purger
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import watching
from tests.proxy import server_through_proxy
from tests.rpc import TIMEOUT

DOWN = 3.0  # seconds: a dozen polls at the default --watch-poll-interval of 0.25 s


def _created_course(stub, code: str, within: float = 15.0) -> int:
    """CreateCourse, tried again while the server's connections come back."""
    deadline = time.monotonic() + within
    while True:
        try:
            return stub.CreateCourse(
                pb.CreateCourseRequest(code=code, title=code), timeout=TIMEOUT
            ).course.id
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.databases("postgresql", "mysql")
def test_an_outage_is_logged_when_it_starts_and_when_it_ends(db_url, caplog):
    caplog.set_level(logging.INFO, logger="enrollment")
    with server_through_proxy(db_url) as (proxy, address), watching.channel(address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        watcher = watching.watched(address, stub)
        try:
            caplog.clear()
            proxy.cut()
            time.sleep(DOWN)
            proxy.restore()
            course = _created_course(stub, "AFTER")
            head = stub.ListEvents(pb.ListEventsRequest(course_id=course), timeout=TIMEOUT).events[
                -1
            ]
            watcher.wait_for(head.sequence, timeout=15)
            time.sleep(1.5)  # the listener's reconnection pause (notify.RETRY) and more
        finally:
            watcher.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    warned = collections.Counter(m.split(":")[0] for level, m in lines if level >= logging.WARNING)
    print("\n" + "\n".join(m for _, m in lines))
    assert warned["watch poller"] == 1, lines
    assert all(count == 1 for count in warned.values()), warned
    assert any("watch poller: working again" in m for _, m in lines), lines


@pytest.mark.databases("sqlite")
def test_the_background_rounds_log_an_outage_once(tmp_path, caplog):
    """The retention purger and SQLite's WAL checkpointer run a round every interval:
    rounds that keep failing are one warning, and the first that works says so."""
    caplog.set_level(logging.INFO, logger="enrollment")
    down = True

    def purge_batch(retention, limit) -> int:
        if down:
            raise DatabaseUnavailable.of()
        return 0

    purger = Purger("change-feed events", 60.0, purge_batch)
    missing = tmp_path / "not-yet"  # the checkpointer's file cannot be opened until made
    checkpointer = Checkpointer(str(missing / "x.db"), timeout=0.1)
    for _ in range(5):
        purger.tick()
        checkpointer.tick()
    down = False
    missing.mkdir()
    purger.tick()
    checkpointer.tick()
    checkpointer.finish()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    warned = collections.Counter(m.split(":")[0] for level, m in lines if level >= logging.WARNING)
    assert warned == {"purging change-feed events": 1, "WAL checkpoint": 1}, lines
    # In SQLite's own words, not only the exception's type.
    assert any(
        m.startswith("WAL checkpoint") and "unable to open database file" in m for _, m in lines
    ), lines
    again = [m for level, m in lines if m.endswith("working again")]
    assert again == ["purging change-feed events: working again", "WAL checkpoint: working again"]
