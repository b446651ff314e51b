"""Background purges of what outlives its retention: request records and change-feed events."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from enrollment.server.errors import EnrollmentError
from enrollment.server.outage import Outage, database_words
from enrollment.server.periodic import Periodic

log = logging.getLogger("enrollment.server")

BATCH = 500
# Between two batches of one purge: callers waiting for the writer lock go first.
PAUSE = 0.05


class Purger(Periodic):
    """A daemon thread: ten times per retention period (at most once a minute, at least
    once a second), deletes what is older than the retention, BATCH rows at a time, each
    batch its own short transaction. Every server process runs one per kind; two deleting
    the same batch is harmless.

    purge_batch(retention, limit) deletes up to `limit` expired rows and says how many."""

    def __init__(
        self, what: str, retention_seconds: float, purge_batch: Callable[[dt.timedelta, int], int]
    ) -> None:
        super().__init__(
            f"{what.replace(' ', '-')}-purger", min(60.0, max(1.0, retention_seconds / 10))
        )
        self.what = what
        self._outage = Outage(log, f"purging {what}", "retrying later")
        self.retention = dt.timedelta(seconds=retention_seconds)
        self._purge_batch = purge_batch

    def purge(self) -> int:
        """Everything expired, BATCH at a time; how many went."""
        total = 0
        while not self.stopping:
            done = self._purge_batch(self.retention, BATCH)
            total += done
            if done < BATCH:
                break
            self.pause(PAUSE)
        return total

    def tick(self) -> None:
        try:
            purged = self.purge()
        except EnrollmentError as exc:  # the database is away: try again next round
            self._outage.failed(database_words(exc))
            return
        except Exception:  # never let the thread die: the next round may work
            self._outage.failed("failed unexpectedly", unexpected=True)
            return
        self._outage.worked()
        if purged:
            log.info("purged %d %s older than %s", purged, self.what, self.retention)
