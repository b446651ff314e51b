"""--event-retention: parse its DURATION, and purge older events in the background."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from enrollment.server.domain import events
from enrollment.server.errors import EnrollmentError

log = logging.getLogger("enrollment.server")


class EventPurger:
    """Every interval, deletes the events older than the retention, in small batches
    (each its own short transaction: see events.purge_batch). Every server process
    runs one; two deleting the same batch is harmless."""

    def __init__(self, retention_seconds: float) -> None:
        self._retention = dt.timedelta(seconds=retention_seconds)
        self._interval = min(60.0, max(1.0, retention_seconds / 10))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-purger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                purged = events.purge_expired(self._retention)
            except EnrollmentError as exc:  # the database is down: next time
                log.warning("event retention: purge failed (%s); retrying later", exc)
                continue
            except Exception:
                log.exception("event retention: purge failed unexpectedly")
                continue
            if purged:
                log.info("event retention: purged %d events", purged)
