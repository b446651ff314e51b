"""SQLite and MariaDB have no notifications: an event committed through one server
process reaches a watcher of another within a look (persistence/notify.py Looks: the
file's change counter on SQLite, the feed's counter row on MariaDB, asked every few tens
of milliseconds while the process has watchers), not at its next poll. Both servers
poll only every 60 s here (--watch-poll-interval), so without the looks every event
would wait for that poll and the first test would fail."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit

import pytest

from enrollment.server.persistence.notify import Looks
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, watching
from tests.proxy import TcpProxy, through

pytestmark = pytest.mark.databases("sqlite", "mysql")

POLL = "60"  # seconds: far beyond any bound below
FAST = 2.0  # seconds from the writer's answer to the watcher (generous: a shared machine)


def _raise_counter(db_url: str) -> None:
    """What a commit with events does to the feed's counter on MariaDB (outbox.py)."""
    databases.query(
        db_url,
        "INSERT INTO event_counters (name, value) VALUES ('sequence', 1) "
        "ON DUPLICATE KEY UPDATE value = value + 1",
    )


def test_another_process_commit_reaches_a_watcher_at_once(db_url, server_process):
    here, there = (
        server_process("--database-url", db_url, "--watch-poll-interval", POLL) for _ in range(2)
    )
    with watching.channel(there.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        watcher = watching.watched(here.address, stub)
        try:
            times = watching.delivery_times(watcher, stub)
        finally:
            watcher.close()
    print(f"\ncross-process delivery: {', '.join(f'{t * 1e3:.0f} ms' for t in times)}")
    assert max(times) < FAST, times


def test_the_database_is_looked_at_only_while_the_process_has_watchers(db_url):
    wakes = threading.Semaphore(0)
    looks = Looks(db_url, wakes.release, timeout=2.0)

    def commit() -> None:  # another connection's, as another process's would be
        if db_url.startswith("sqlite"):
            databases.query(db_url, "CREATE TABLE IF NOT EXISTS t (x INTEGER)")
            databases.query(db_url, "INSERT INTO t VALUES (1)")
        else:
            _raise_counter(db_url)

    looks.start()
    try:
        watching.wakes_only_while_wanted(looks, wakes, commit, settle=0.2)
    finally:
        looks.stop()
    assert not looks._thread.is_alive()


@pytest.mark.databases("mysql")
def test_looks_come_back_after_the_database_line_is_cut(db_url, caplog):
    """A look that fails is logged once and tried again on a new connection; the first
    look that works wakes the poller, for whatever committed while the line was down."""
    caplog.set_level(logging.INFO, logger="enrollment.watch")
    target = urlsplit(db_url)
    proxy = TcpProxy((target.hostname, target.port))
    wakes = threading.Semaphore(0)
    looks = Looks(through(proxy, db_url), wakes.release, timeout=1.0)
    looks.start()
    try:
        looks.want(True)
        assert wakes.acquire(timeout=5.0), "not woken at the first look"
        proxy.cut()
        time.sleep(0.5)  # looks fail while the line is down
        _raise_counter(db_url)
        proxy.restore()
        assert wakes.acquire(timeout=10.0), "not woken once the looks worked again"
    finally:
        looks.stop()
        proxy.close()
    warnings = [r for r in caplog.records if "change-feed looks" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # down once, back once
