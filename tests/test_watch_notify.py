"""PostgreSQL LISTEN/NOTIFY: an event committed through one server process reaches a
watcher of another at once, not at its next poll. Both servers poll only every 60 s
here (--watch-poll-interval), so without the notification every event would wait for
that poll and each test would fail. The listening connection comes back after the line
to the database is cut and restored."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import pytest

from enrollment.server.persistence.notify import CHANNEL, CommitListener
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, watching
from tests.proxy import TcpProxy, through

pytestmark = pytest.mark.databases("postgresql")

POLL = "60"  # seconds: far beyond any bound below
FAST = 2.0  # seconds from the writer's answer to the watcher (generous: a shared machine)
WRITES = 5


def _serve(server_process, url: str):
    return server_process(
        "--database-url", url, "--watch-poll-interval", POLL, "--database-timeout", "2"
    )


def _listeners(db_url: str) -> int:
    name = db_url.rsplit("/", 1)[1]
    return databases.query(
        db_url,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = ? AND application_name = ?",
        (name, "enrollment-listen"),
    )[0][0]


def test_another_process_commit_reaches_a_watcher_at_once(db_url, server_process):
    here, there = _serve(server_process, db_url), _serve(server_process, db_url)
    with watching.channel(there.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        watcher = watching.watched(here.address, stub)
        try:
            times = watching.delivery_times(watcher, stub, WRITES)
        finally:
            watcher.close()
    print(f"\ncross-process delivery: {', '.join(f'{t * 1e3:.0f} ms' for t in times)}")
    assert max(times) < FAST, times


def test_the_listener_comes_back_after_the_database_line_is_cut(db_url, server_process):
    target = urlsplit(db_url)
    proxy = TcpProxy((target.hostname, target.port))
    try:
        here = _serve(server_process, through(proxy, db_url))
        there = _serve(server_process, db_url)
        with watching.channel(there.address) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            watcher = watching.watched(here.address, stub)
            try:
                assert _listeners(db_url) == 2
                proxy.cut()
                deadline = time.monotonic() + 15
                while _listeners(db_url) != 1:  # the database saw the line go
                    assert time.monotonic() < deadline, "the cut listener is still there"
                    time.sleep(0.1)
                time.sleep(1.5)  # it tries again, and fails, while the line is down
                proxy.restore()
                while _listeners(db_url) != 2:
                    assert time.monotonic() < deadline + 15, "the listener did not come back"
                    time.sleep(0.1)
                times = watching.delivery_times(watcher, stub, WRITES)
            finally:
                watcher.close()
        assert max(times) < FAST, times
        assert "change-feed listener" in here.log
    finally:
        proxy.close()


def test_a_process_listens_only_while_it_has_watchers(db_url):
    """Without watchers nobody here needs other processes' commits: the listener's
    connection stays open but does not LISTEN, so no commit anywhere wakes it."""
    wakes = threading.Semaphore(0)
    listener = CommitListener(db_url, wakes.release, timeout=2.0)

    def notify() -> None:
        databases.query(db_url, f"NOTIFY {CHANNEL}, 'another-process'")

    listener.start()
    try:
        deadline = time.monotonic() + 15
        while _listeners(db_url) != 1:  # connected, not listening
            assert time.monotonic() < deadline, "the listener did not connect"
            time.sleep(0.05)
        watching.wakes_only_while_wanted(listener, wakes, notify, settle=0.5)  # UNLISTEN
    finally:
        listener.stop()
