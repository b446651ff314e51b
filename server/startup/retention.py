"""--event-retention: parse its DURATION, and purge older events in the background."""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading

from enrollment.server.domain import events
from enrollment.server.errors import EnrollmentError

log = logging.getLogger("enrollment.server")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s' or plain seconds; above 0."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found or float(found[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration above 0 such as 30d, 12h, 90m or 3600")
    return float(found[1]) * _UNIT[found[2]]


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
