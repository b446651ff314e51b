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

from enrollment.server.outage import Outage, database_words
from enrollment.server.periodic import Periodic

log = logging.getLogger("enrollment.server")

INTERVAL = 0.25
AUTOCHECKPOINT_PAGES = 10_000


class Checkpointer(Periodic):
    def __init__(self, path: str, *, interval: float = INTERVAL, timeout: float = 5.0) -> None:
        super().__init__("wal-checkpointer", interval)
        self.path = path
        self.timeout = timeout
        self._connection: sqlite3.Connection | None = None
        self._outage = Outage(log, "WAL checkpoint", "retrying")

    def tick(self) -> None:
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(
                    self.path, timeout=self.timeout, check_same_thread=False
                )
            self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._outage.worked()
        except sqlite3.Error as exc:  # the writers' own checkpoint still works
            self._outage.failed(f"failed: {database_words(exc)}")
            self._close()  # a new connection next round

    def finish(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
