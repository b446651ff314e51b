"""Periodic: a daemon thread that does one round of work every `interval` seconds until
stopped (the SQLite WAL checkpointer, the retention purgers)."""

from __future__ import annotations

import threading


class Periodic:
    """Subclasses define tick(), one round, which must not raise (log and go on: the
    next round may work), and may define finish(), run in the thread after its last
    round."""

    def __init__(self, name: str, interval: float) -> None:
        self.interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stop_soon()
        self.join(10)

    def stop_soon(self) -> None:
        """Tell the thread to stop after its round, without waiting for it (join())."""
        self._stopping.set()
        self.interrupt()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(max(0.0, timeout))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def pause(self, seconds: float) -> None:
        """Wait within a round; stop() ends the wait at once."""
        self._stopping.wait(seconds)

    def tick(self) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        """Called by stop() once stopping is set: ends a wait of tick() other than
        pause() (which stop() ends by itself)."""

    def finish(self) -> None:
        """After the last round (stop() was called)."""

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.tick()
        self.finish()
