"""Purges request records older than --request-id-retention, in the background."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from enrollment.server.domain import retries
from enrollment.server.errors import EnrollmentError

log = logging.getLogger("enrollment.retries")

BATCH = 500
# Between two batches of one purge: callers waiting for the writer lock go first.
PAUSE = 0.05


class RequestRecordPurger:
    """A daemon thread: every `interval` seconds, deletes expired records BATCH at a time,
    each batch its own short transaction."""

    def __init__(self, retention: float, interval: float) -> None:
        self.retention = dt.timedelta(seconds=retention)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-id-purger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def purge(self) -> int:
        """Every expired record, BATCH at a time; how many went."""
        total = 0
        while not self._stop.is_set():
            done = retries.purge_expired(self.retention, BATCH)
            total += done
            if done < BATCH:
                break
            self._stop.wait(PAUSE)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                purged = self.purge()
            except EnrollmentError as exc:  # the database is away: try again next round
                log.warning("purging request records: %s", exc)
                continue
            except Exception:  # never let the thread die: the next round may work
                log.exception("purging request records failed")
                continue
            if purged:
                log.info("purged %d request records older than %s", purged, self.retention)
