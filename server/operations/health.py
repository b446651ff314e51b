"""Probes the database in the background and reports whether the server can serve."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from enrollment.server.persistence import engine

log = logging.getLogger("enrollment.server")


class HealthMonitor:
    """Probes the database every interval on a connection of its own, and reports the
    server not serving (report(False)) while the probe fails, serving again once it
    succeeds."""

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
        self._probe = engine.open_probe(
            database_url, timeout=min(database_timeout, max(1.0, interval))
        )
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
            try:
                engine.ping(self._probe)
                ok, reason = True, ""
            except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
                ok, reason = False, str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if ok != self._serving and not self._stopped.is_set():
                self._serving = ok
                if not ok:
                    engine.discard_idle()
                    log.warning("database unreachable, health NOT_SERVING: %s", reason)
                else:
                    log.info("database reachable again, health SERVING")
                self._report(ok)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval + 5)
