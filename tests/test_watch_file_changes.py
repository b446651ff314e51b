"""SQLite: an event committed through one server process reaches a watcher of another
at once, not at its next poll. SQLite has no notifications; each process asks the file
whether another connection committed (`PRAGMA data_version`, persistence/notify.py
FileChanges) every few milliseconds while it has watchers. Both servers poll only every
60 s here (--watch-poll-interval), so without those looks every event would wait for
that poll and the first test would fail."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from enrollment.server.persistence import engine
from enrollment.server.persistence.notify import FileChanges
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import watching

pytestmark = pytest.mark.databases("sqlite")

POLL = "60"  # seconds: far beyond any bound below
FAST = 2.0  # seconds from the writer's answer to the watcher (generous: a shared machine)


def test_another_process_commit_reaches_a_watcher_at_once(db_url, server_process):
    here, there = (
        server_process("--database-url", db_url, "--watch-poll-interval", POLL) for _ in range(2)
    )
    with watching.channel(there.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        watcher = watching.watched(here, stub)
        try:
            times = watching.delivery_times(watcher, stub)
        finally:
            watcher.close()
    print(f"\ncross-process delivery: {', '.join(f'{t * 1e3:.0f} ms' for t in times)}")
    assert max(times) < FAST, times


def test_the_file_is_looked_at_only_while_the_process_has_watchers(db_url):
    path = engine.parse(db_url).name
    wakes = threading.Semaphore(0)
    changes = FileChanges(path, wakes.release, timeout=2.0)

    def commit() -> None:  # another connection, as another process's would be
        with sqlite3.connect(path) as other:
            other.execute("CREATE TABLE IF NOT EXISTS t (x)")
            other.execute("INSERT INTO t VALUES (1)")
        other.close()

    changes.start()
    try:
        watching.wakes_only_while_wanted(changes, wakes, commit, settle=0.2)
    finally:
        changes.stop()
    assert not changes._thread.is_alive()
