"""Probes the database in the background and reports whether the server can serve."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import peewee as pw

from enrollment.server.persistence import engine

log = logging.getLogger("enrollment.server")


class HealthMonitor:
    """Probes the database every interval on a connection of its own, and reports the
    server not serving (report(False)) while the probe fails, serving again once it
    succeeds."""

    APPLICATION_NAME = "enrollment-health"  # its connection's, on PostgreSQL

    def __init__(
        self,
        report: Callable[[bool], None],
        *,
        database_url: str,
        interval: float,
        database_timeout: float,
    ) -> None:
        self._report = report
        self._interval = interval
        # The probe gives up well within one interval or two, whatever the database does.
        timeout = min(database_timeout, max(1.0, interval))
        extra = {}
        if engine.url_kind(database_url) == "postgresql":
            extra["application_name"] = self.APPLICATION_NAME
        self._probe = engine.open_probe(database_url, timeout=timeout, **extra)
        self._stopped = threading.Event()
        self._serving = True
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._probe_until_stopped()
        finally:
            self._probe.close()  # the connection belongs to this thread: closed here

    def _probe_until_stopped(self) -> None:
        while not self._stopped.wait(self._interval):
            ok, reason = self._check()
            if ok != self._serving and not self._stopped.is_set():
                self._serving = ok
                if not ok:
                    engine.discard_idle()
                    log.warning("database unreachable, health NOT_SERVING: %s", reason)
                else:
                    log.info("database reachable again, health SERVING")
                self._report(ok)

    def _check(self) -> tuple[bool, str]:
        """(reachable, why not). A kept connection that fails is tried once more, afresh:
        the database may have ended only that connection (pg_terminate_backend, a
        pooler's or a proxy's recycling, an idle timeout) while it serves every other."""
        kept = not self._probe.is_closed()
        failure = _ping(self._probe)  # closes the connection when it fails
        if failure is not None and kept:
            failure = _ping(self._probe)
        return failure is None, failure or ""

    def stop_soon(self) -> None:
        """Tell the probe to stop, without waiting for it (join())."""
        self._stopped.set()

    def join(self, timeout: float) -> None:
        self._thread.join(max(0.0, timeout))


def _ping(db: pw.Database) -> str | None:
    """None when SELECT 1 works on db, else the first line of what went wrong."""
    try:
        engine.ping(db)
    except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None
