"""SQLite's WAL checkpoints, moved off the write path.

By default SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages:
that commit copies the WAL's pages back into the database file and fsyncs it before it
returns, and on the server's one writer thread every queued write waits behind it. In
a small database those pages are few and close together; at ten million enrollments
they are scattered over gigabytes, and EnrollStudent's p99 grew 2.4-2.9x from 11,000
to 10,000,000 rows (`make bench-scale`), against 1.1x with no checkpoint during the
measurement.

So each server process runs a Checkpointer: a daemon thread with a connection of its
own that runs `PRAGMA wal_checkpoint(PASSIVE)` every INTERVAL seconds. PASSIVE takes
no lock a writer or reader waits for; it copies what no reader still needs. Writers
keep an automatic checkpoint as a safety net (AUTOCHECKPOINT_PAGES, about 40 MB of WAL
with 4 KiB pages), reached only when this thread is stalled or gone. Durability is
unchanged: a commit is durable once its WAL frames are synced (synchronous=FULL).
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("enrollment.server")

INTERVAL = 0.25
AUTOCHECKPOINT_PAGES = 10_000


class Checkpointer:
    def __init__(self, path: str, *, interval: float = INTERVAL, timeout: float = 5.0) -> None:
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        failing = False
        while not self._stop.wait(self.interval):
            try:
                if connection is None:
                    connection = sqlite3.connect(
                        self.path, timeout=self.timeout, check_same_thread=False
                    )
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                failing = False
            except sqlite3.Error as exc:  # the writers' own checkpoint still works
                if not failing:
                    log.warning("WAL checkpoint failed (%s); retrying", type(exc).__name__)
                failing = True
                if connection is not None:
                    connection.close()
                    connection = None
        if connection is not None:
            connection.close()
