"""The unit of work: one connection and one transaction per call, deadlock victims run again.

A write whose COMMIT fails on PostgreSQL or MariaDB may have committed (the database
may have done it and only its answer was lost): that is CommitOutcomeUnknown, never
"nothing changed", and never run again here.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from enrollment.server import callstate
from enrollment.server.errors import CommitOutcomeUnknown, DatabaseUnavailable, StorageFull
from enrollment.server.persistence import engine, outbox
from enrollment.server.persistence.engine import discard_idle
from enrollment.server.persistence.failures import (
    Verdict,
    first_line,
    lost_connection,
    storage_full_events,
    verdict,
)
from enrollment.server.persistence.models import proxy

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("enrollment.db")

# A transaction chosen as a deadlock victim is run again this many times in all.
ATTEMPTS = 3


class FairLock:
    """A lock handed to its waiters in arrival order. threading.Lock is not: a thread that
    releases it and asks again (a batch after a batch) may get it back before one that
    waited, and single calls queued behind back-to-back batches of 1000 waited 500 ms
    at p99 (make bench-import)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._guard:
            if not self._held and not self._waiters:
                self._held = True
                return True
            if not blocking:
                return False
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        if turn.acquire(timeout=timeout):
            return True  # release() handed the lock over, still held
        with self._guard:
            if turn in self._waiters:
                self._waiters.remove(turn)
                return False
        return True  # handed over just as the wait timed out: ours after all

    def release(self) -> None:
        with self._guard:
            if self._waiters:
                self._waiters.popleft().release()  # the next in line; _held stays True
            else:
                self._held = False

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# SQLite admits one writer at a time, and a writer that finds the file locked polls with
# sleeps of up to 100 ms, which made the write p99 under concurrent writers many times
# the call (bench/PROFILE.md, "Figures behind code comments"). Writers of one process
# queue on this lock instead, in arrival order; only other processes meet the busy
# timeout.
_sqlite_writer = FairLock()


@contextlib.contextmanager
def _writer_turn(write: bool) -> Iterator[None]:
    if not (write and isinstance(proxy.obj, pw.SqliteDatabase)):
        yield
        return
    # As long as SQLite's busy timeout: both are waits for the write lock.
    if not _sqlite_writer.acquire(timeout=engine.timeouts().database):
        raise DatabaseUnavailable.of()
    try:
        yield
    finally:
        _sqlite_writer.release()


@contextlib.contextmanager
def unit_of_work(*, write: bool, snapshot: bool = True) -> Iterator[None]:
    """One connection and one transaction; writers take SQLite's write lock up front.

    A call whose deadline passed or that was cancelled does not start, and does not
    commit: CallEnded raised before the commit rolls the transaction back.

    snapshot=False (reads only): no transaction, each statement in autocommit is its own
    snapshot. For a read of one statement that is the same answer without BEGIN and
    COMMIT, two round trips to the database (bench/PROFILE.md).
    """
    callstate.ensure_active()
    db = proxy.obj
    pending = outbox.begin() if write else None
    written = 0
    stage = "work"  # then "commit" while COMMIT runs, then "done"
    try:
        with proxy.connection_context(), _writer_turn(write):
            begin = ("IMMEDIATE",) if write and isinstance(db, pw.SqliteDatabase) else ()
            with proxy.atomic(*begin) if snapshot else contextlib.nullcontext():
                yield
                callstate.ensure_active()
                if write:
                    # The change's events, numbered: the last statements before the commit.
                    written = outbox.flush()
                stage = "commit"
            stage = "done"
        if written:
            outbox.committed()  # wakes this process's watchers now, not at their next poll
    except (pw.DatabaseError, pw.InterfaceError, MaxConnectionsExceeded) as exc:
        found = verdict(exc)
        if found is Verdict.UNAVAILABLE and lost_connection(exc):
            # The idle connections went down with this one: drop them now, so the
            # calls after an outage open fresh connections instead of failing one by one.
            discard_idle()
        if stage == "done":
            # Committed; only handing the connection back failed. The answer stands.
            log.warning("after a commit, releasing the connection failed: %s", first_line(exc))
            return
        if found is Verdict.FULL:  # refused, at COMMIT too: the database said so
            _storage_full(exc)
            raise StorageFull.of() from exc
        if stage == "commit" and write and _outcome_unknown(db, exc):
            raise CommitOutcomeUnknown.of() from exc
        if found is not None:
            raise _Transient(found) from exc
        raise
    finally:
        if pending is not None:
            outbox.end(pending)


def _outcome_unknown(db: pw.Database, exc: BaseException) -> bool:
    """Whether a failed COMMIT may still have committed. A database across a connection
    may have committed and lost only its answer. SQLite's COMMIT runs in this process
    and says what happened (locked, full: not committed), except after an I/O error,
    when frames it wrote may be found committed when the file is next opened."""
    if not isinstance(db, pw.SqliteDatabase):
        return True
    return "disk i/o error" in str(exc).lower()


def _storage_full(exc: BaseException) -> None:
    """Count a write refused for want of space; one log line (no traceback) at most
    every few seconds, saying how many it stands for."""
    count = storage_full_events.record()
    if count is not None:
        log.warning(
            "storage full: the database refused %d write(s) for want of space "
            "(reads still work; writes resume once space is freed): %s",
            count,
            first_line(exc),
        )


class _Transient(Exception):
    """A database failure a retry can help with."""

    def __init__(self, found: Verdict):
        super().__init__(found.value)
        self.verdict = found


def savepoint():
    """A nested transaction: a constraint error inside it leaves the outer one usable."""
    return proxy.atomic()


def statement_guard():
    """What a statement that may break a constraint runs in, so that the transaction goes
    on after it: a savepoint on PostgreSQL, where any failed statement aborts the whole
    transaction; nothing on SQLite and MariaDB, where a failed statement undoes only
    itself (two statements fewer on the hot path of EnrollStudent and batches)."""
    if isinstance(proxy.obj, pw.PostgresqlDatabase):
        return proxy.atomic()
    return contextlib.nullcontext()


def locking(query: pw.Select) -> pw.Select:
    """SELECT … FOR UPDATE where the database has it. SQLite needs none: a writer there
    holds the whole database from BEGIN IMMEDIATE on."""
    return query if isinstance(proxy.obj, pw.SqliteDatabase) else query.for_update()


def sharing(query: pw.Select) -> pw.Select:
    """A locking read that shares: it waits for a writer of the row to commit and then
    reads the latest committed version (InnoDB's plain reads would read the
    transaction's snapshot), without blocking other sharers."""
    db = proxy.obj
    if isinstance(db, pw.SqliteDatabase):
        return query
    return query.for_update(
        "LOCK IN SHARE MODE" if isinstance(db, pw.MySQLDatabase) else "FOR SHARE"
    )


# With tracing on (operations/tracing.py), what each transaction of a transactional
# function runs in: observer(function name, write, attempt), a span. None when off, and
# then the one check below is all the hook costs.
_observer: Callable[[str, bool, int], contextlib.AbstractContextManager[None]] | None = None


def observe_transactions(
    observer: Callable[[str, bool, int], contextlib.AbstractContextManager[None]] | None,
) -> None:
    """Run every transaction of a transactional function inside observer(...) (None: not)."""
    global _observer
    _observer = observer


def transactional(
    *, write: bool, snapshot: bool = True
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated service function as one unit of work; a deadlock victim is run
    again from the start (its transaction was rolled back whole), up to ATTEMPTS times.

    snapshot=False: a read whose answer is one statement (a second one at most to tell
    an empty result from a missing filter, which needs no common snapshot) runs it
    without a transaction; see unit_of_work."""
    if write and not snapshot:
        raise ValueError("a write always runs in a transaction")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    if _observer is None:
                        with unit_of_work(write=write, snapshot=snapshot):
                            return fn(*args, **kwargs)
                    with (
                        _observer(fn.__name__, write, attempt),
                        unit_of_work(write=write, snapshot=snapshot),
                    ):
                        return fn(*args, **kwargs)
                except _Transient as exc:
                    if exc.verdict is not Verdict.RETRY or attempt == ATTEMPTS:
                        raise DatabaseUnavailable.of() from exc.__cause__
                    log.debug("%s: deadlock, attempt %d, running again", fn.__name__, attempt)
                    time.sleep(random.uniform(0.001, 0.01 * attempt))
            raise AssertionError("unreachable")

        return wrapper

    return decorate
