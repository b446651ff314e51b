"""Outage: what a part that keeps trying (a poller, a listener, a background thread)
logs while its database is away: one WARNING when its failures start, one INFO when it
works again, nothing per retry in between. An outage of a minute is two lines a part.
first_line, database_words: what such a line says of the error."""

from __future__ import annotations

import logging


def first_line(exc: BaseException) -> str:
    """What a log line says of an error (a database's, say): its first line, or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def database_words(exc: BaseException) -> str:
    """What a log line says of an error raised for a database failure: the database's
    (or driver's) own words when it carries them as its cause, since the message meant
    for the caller ("retry the call") is no help in a log."""
    return first_line(exc.__cause__) if exc.__cause__ is not None else first_line(exc)


class Outage:
    """failed(reason) after each failed try, worked() after each one that worked.
    One instance per part, used from one thread (or one event loop)."""

    def __init__(self, log: logging.Logger, part: str, meanwhile: str = "") -> None:
        self._log, self._part, self._meanwhile = log, part, meanwhile
        self.ongoing = False

    def failed(self, reason: str, *, unexpected: bool = False) -> None:
        """unexpected: called in an `except` for what is no database outage (a defect):
        logged at ERROR with its traceback, still once."""
        if self.ongoing:
            return
        self.ongoing = True
        line = f"{self._part}: {reason}" + (f"; {self._meanwhile}" if self._meanwhile else "")
        if unexpected:
            self._log.exception("%s", line)
        else:
            self._log.warning("%s", line)

    def worked(self) -> None:
        if self.ongoing:
            self.ongoing = False
            self._log.info("%s: working again", self._part)
