"""The unit of work: one connection and one transaction per call, deadlock victims run again.

A write whose COMMIT fails on PostgreSQL or MariaDB may have committed (the database
may have done it and only its answer was lost): that is CommitOutcomeUnknown, never
"nothing changed", and never run again here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ParamSpec, Protocol, TypeVar

import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from enrollment.server import callstate
from enrollment.server.errors import CommitOutcomeUnknown, DatabaseUnavailable, StorageFull
from enrollment.server.outage import first_line
from enrollment.server.persistence import engine, outbox
from enrollment.server.persistence.engine import discard_idle
from enrollment.server.persistence.failures import (
    Verdict,
    lost_connection,
    may_have_committed,
    read_only_events,
    sqlite_busy,
    storage_full_events,
    verdict,
)
from enrollment.server.persistence.models import proxy

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("enrollment.db")

# A transaction chosen as a deadlock victim is run again this many times in all.
ATTEMPTS = 3
# The attempt of the unit of work running on this thread (transactional), from 1.
_attempt: ContextVar[int] = ContextVar("attempt", default=ATTEMPTS)


class RunAgain(Exception):
    """Raised by a transactional function that found what it read move under it before
    it could lock it in order: its transaction is rolled back and it runs again from the
    start, as a deadlock victim does but without the deadlock. Raise it only while
    final_attempt() is False."""


def final_attempt() -> bool:
    """Whether the running unit of work may no longer raise RunAgain."""
    return _attempt.get() >= ATTEMPTS


def in_line(statement: Callable[..., R], *values: Any) -> R:
    """statement(*values), a statement that waits for the transactions holding one key
    to end, as the claim of a request_id does (domain/retries.py). Several calls
    waiting there for a holder that rolls back are InnoDB's duplicate-key deadlock: each
    waiter holds a shared lock on the key and needs an exclusive one, so all but one
    are victims, again at each holder that fails. That is waiting in line, not a database in
    trouble: such a victim runs again without spending one of its ATTEMPTS, for as
    long as --database-timeout allows a call to wait for a lock (transactional). The
    statement's error is marked. A plain call, not a context manager: a request_id's
    claim is on the write mix's path, and contextlib's generator cost about 8,000
    instructions a call there (`make bench-icount`)."""
    try:
        return statement(*values)
    except pw.DatabaseError as exc:
        exc.in_line = True  # type: ignore[attr-defined]
        raise


class _Waiter(Protocol):
    def release(self) -> None: ...


class FairLock:
    """A lock handed to its waiters in arrival order. threading.Lock is not: a thread that
    releases it and asks again (a batch after a batch) may get it back before one that
    waited, and single calls queued behind back-to-back batches of 1000 waited 500 ms
    at p99 (make bench-import)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: collections.deque[_Waiter] = collections.deque()

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

    async def acquire_on_loop(self) -> None:
        """On an event loop: wait for the lock as a coroutine (the loop thread goes on
        serving other calls), in the same arrival order as the threads that wait."""
        with self._guard:
            if not self._held and not self._waiters:
                self._held = True
                return
            loop = asyncio.get_running_loop()
            turn = _LoopTurn(loop, loop.create_future())
            self._waiters.append(turn)
        try:
            await turn.future
        except asyncio.CancelledError:
            with self._guard:
                if turn in self._waiters:
                    self._waiters.remove(turn)
                    raise
            self.release()  # handed over as the wait was cancelled: pass it on
            raise

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


class _LoopTurn:
    """A coroutine waiting in a FairLock's line: release() hands it the lock."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        self.loop, self.future = loop, future

    def release(self) -> None:
        self.loop.call_soon_threadsafe(_hand_over, self.future)


def _hand_over(future: asyncio.Future[None]) -> None:
    if not future.done():  # else cancelled: its waiter passes the lock on
        future.set_result(None)


# SQLite admits one writer at a time, and a writer that finds the file locked polls with
# sleeps of up to 100 ms, which made the write p99 under concurrent writers many times
# the call (bench/PROFILE.md, "Figures behind code comments"). Writers of one process
# queue on this lock instead, in arrival order; only other processes meet the busy
# timeout.
_sqlite_writer = FairLock()


# Set while a call on the event loop holds _sqlite_writer (LoopTurn): its unit of work
# neither takes the lock nor gives it back, nor waits for the file's (_transaction).
_turn_held: ContextVar[bool] = ContextVar("sqlite_writer_held", default=False)


class _WriterTurn:
    """SQLite's write lock of this process, for a unit of work that writes."""

    __slots__ = ("taken",)

    def __enter__(self) -> None:
        self.taken = not _turn_held.get()
        # As long as SQLite's busy timeout: both are waits for the write lock.
        if self.taken and not _sqlite_writer.acquire(timeout=engine.timeouts().database):
            raise DatabaseUnavailable.of()

    def __exit__(self, *exc: object) -> None:
        if self.taken:
            _sqlite_writer.release()


class LoopTurn:
    """For a SQLite write run on the event loop (transport/interceptors.py, LoopWrites):
    `async with turn:` waits for this process's writer lock as a coroutine, then
    turn.run(fn, *args) runs fn(*args) holding it, without waiting for the file's lock
    (WouldWait when another process holds it)."""

    async def __aenter__(self) -> None:
        await _sqlite_writer.acquire_on_loop()

    async def __aexit__(self, *exc: object) -> None:
        _sqlite_writer.release()

    @staticmethod
    def run(fn: Callable[..., R], *args: object) -> R:
        token = _turn_held.set(True)
        try:
            return fn(*args)
        finally:
            _turn_held.reset(token)

    @staticmethod
    @contextlib.contextmanager
    def together() -> Iterator[_Group]:
        """Holding the turn: one transaction and one COMMIT (one fsync) for several
        writes, each run through group.run(...) as a savepoint of it (a write that
        fails rolls back its own savepoint only). BEGIN IMMEDIATE gives way as a single
        write's does (WouldWait, nothing done). A failed COMMIT raises the
        EnrollmentError that every member that had succeeded is answered with; nothing
        of the group is committed then, or, where the database cannot tell
        (COMMIT_OUTCOME_UNKNOWN), no member is told that nothing changed.

        The members' events are numbered and inserted by the group, as the last
        statements before its COMMIT: one counter raise and one INSERT for them all, in
        the members' order (each member's were taken at its end, its snapshots showing
        the state after it; a member that failed has none). bench/PROFILE.md has the
        figures."""
        db = proxy.obj
        group = _Group(db)
        committing = False
        written = 0
        try:
            connection = _KeptConnection(db) if _keeper.on else db.connection_context()
            with connection, _immediate_or_give_way(db):
                yield group
                written = outbox.write(group.rows)
                committing = True
        except (pw.DatabaseError, pw.InterfaceError, MaxConnectionsExceeded) as exc:
            failure = _failure(db, exc, verdict(exc), committing=committing)
            if isinstance(failure, _Transient):
                raise DatabaseUnavailable.of() from exc
            if failure is exc:
                raise
            raise failure from exc
        if written:
            outbox.committed()


class _Group:
    """Several SQLite writes on the event loop in one transaction (LoopTurn.together)."""

    __slots__ = ("db", "rows")

    def __init__(self, db: pw.Database) -> None:
        self.db = db
        self.rows: list[outbox.Row] = []  # the events of the members that succeeded

    def run(self, fn: Callable[..., R], *args: object) -> R:
        """fn(*args) as a member of the group: its unit of work is a savepoint of the
        group's transaction, and holds the writer lock through the group."""
        held, grouped = _turn_held.set(True), _grouped.set(self)
        try:
            return fn(*args)
        finally:
            _grouped.reset(grouped)
            _turn_held.reset(held)

    def intact(self) -> bool:
        """Whether the group's transaction is still open. SQLite rolls a whole
        transaction back by itself on some errors (a full disk, an I/O error): then the
        members before have nothing left to commit."""
        return bool(self.db.connection().in_transaction)


# Set while a write runs as a member of a group (_Group.run).
_grouped: ContextVar[_Group | None] = ContextVar("sqlite_write_group", default=None)


_NOTHING = contextlib.nullcontext()


def _writer_turn(write: bool) -> contextlib.AbstractContextManager[None]:
    if write and isinstance(proxy.obj, pw.SqliteDatabase):
        return _WriterTurn()
    return _NOTHING


class _Keeper(threading.local):
    on = False  # whether this thread keeps its connection between units of work
    ident = 0


_keeper = _Keeper()


@contextlib.contextmanager
def connection_kept() -> Iterator[None]:
    """Inside: this thread keeps its pooled connection from one unit of work to the
    next instead of handing it back to the pool and taking it out again for every call
    (peewee's pool takes two locks and wakes a waiter each way: the largest single item
    of a read's own CPU, bench/PROFILE.md; on PostgreSQL and MariaDB also a round trip
    that tests the connection). For the threads that run a process's calls one after
    another for its whole life: SQLite's loop thread and writer thread, which the pool
    has a connection set aside for each, and the serving pool's threads on PostgreSQL
    and MariaDB (startup/server.py). Between calls the
    connection counts as idle in engine.connections_in_use; a database error hands it
    back, so the next call takes a fresh one. On leaving, it goes back to the pool."""
    _keeper.on, _keeper.ident = True, threading.get_ident()
    try:
        yield
    finally:
        _keeper.on = False
        _hand_back(proxy.obj)


def _hand_back(db: pw.Database | None) -> None:
    engine.kept_idle.discard(_keeper.ident)
    if db is not None and not db.is_closed():
        with contextlib.suppress(Exception):
            db.close()


class _KeptConnection:
    """A unit of work's connection on a thread that keeps it (connection_kept).

    A kept connection is used again without the pool's test on checkout (a round trip
    on PostgreSQL and MariaDB), so one that died while kept (the database restarted, an
    idle timeout cut it) is found by the call's first statement: `reused` tells
    unit_of_work, which runs such a call once more on a new connection when nothing
    of it can have committed (_StaleConnection)."""

    __slots__ = ("db", "reused")

    def __init__(self, db: pw.Database) -> None:
        self.db = db
        self.reused = False

    def __enter__(self) -> None:
        if self.db.is_closed():
            self.db.connect()
        else:
            self.reused = True
        engine.kept_idle.discard(_keeper.ident)

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        broken = kind is not None and issubclass(kind, (pw.DatabaseError, pw.InterfaceError))
        if broken and _grouped.get() is None:  # a group's member: the group's to decide
            _hand_back(self.db)  # it may be broken: the next call takes another
        elif not self.db.is_closed():
            engine.kept_idle.add(_keeper.ident)


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
    group = _grouped.get() if write else None  # a member of LoopTurn.together's group
    written = 0
    held: list[outbox.Row] = []  # a group member's events, for the group to write
    stage = "work"  # then "commit" while COMMIT runs, then "done"
    connection = _KeptConnection(db) if _keeper.on else db.connection_context()
    try:
        with connection, _writer_turn(write):
            with _transaction(db, write=write, snapshot=snapshot):
                yield
                callstate.ensure_active()
                if write and group is None:
                    # The change's events, numbered: the last statements before the
                    # commit (on PostgreSQL the COMMIT goes with them: commit_sent()).
                    written = outbox.flush()
                elif write:
                    # A member of a group: its snapshots are taken now, at its end, and
                    # the group numbers and inserts every member's events at once
                    # before its COMMIT (LoopTurn.together).
                    held = outbox.take()
                stage = "commit"
            stage = "done"
        if group is not None:
            group.rows += held
        if written:
            outbox.committed()  # wakes this process's watchers now, not at their next poll
    except (pw.DatabaseError, pw.InterfaceError, MaxConnectionsExceeded) as exc:
        found = verdict(exc)
        if stage == "done":
            _discard_if_lost(exc, found)
            # Committed; only handing the connection back failed. The answer stands.
            log.warning("after a commit, releasing the connection failed: %s", first_line(exc))
            return
        commit_sent = write and outbox.commit_sent()
        failure = _failure(
            db, exc, found, committing=stage == "commit" and write, commit_sent=commit_sent
        )
        if (
            isinstance(failure, _Transient)
            and stage == "work"
            and not commit_sent
            and isinstance(connection, _KeptConnection)
            and connection.reused
            and lost_connection(exc)
        ):
            # No COMMIT went out: the database rolled the transaction back with the
            # connection, and the call may run again on a new one.
            raise _StaleConnection(failure.verdict) from exc
        if failure is exc:
            raise
        raise failure from exc
    finally:
        if pending is not None:
            outbox.end(pending)


def _discard_if_lost(exc: BaseException, found: Verdict | None) -> None:
    """The idle connections went down with this one: drop them now, so the calls after
    an outage open fresh connections instead of failing one by one."""
    if found is Verdict.UNAVAILABLE and lost_connection(exc):
        discard_idle()


def failed_read(exc: BaseException) -> BaseException:
    """What a read's database failure outside a unit of work (persistence/loop_reads.py)
    is raised as, as a unit of work would raise it: DatabaseUnavailable for a failure
    that a later call may not meet (the pool's idle connections are dropped with a lost
    one), StorageFull, or exc itself (a bug or a schema mismatch: INTERNAL)."""
    failure = _failure(proxy.obj, exc, verdict(exc), committing=False)
    if isinstance(failure, _Transient):
        return DatabaseUnavailable.of()
    return failure


def _failure(
    db: pw.Database,
    exc: BaseException,
    found: Verdict | None,
    *,
    committing: bool,
    commit_sent: bool = False,
) -> BaseException:
    """What a transaction's database failure is raised as: StorageFull,
    CommitOutcomeUnknown, _Transient (found: its verdict), or exc itself."""
    _discard_if_lost(exc, found)
    if found is Verdict.FULL:  # refused, at COMMIT too: the database said so
        _storage_full(exc)
        return StorageFull.of()
    if found is Verdict.READ_ONLY:  # refused: the database said so
        _read_only(exc)
        return DatabaseUnavailable.read_only()
    if committing and _outcome_unknown(db, exc):
        return CommitOutcomeUnknown.of()
    if commit_sent and may_have_committed(exc):
        return CommitOutcomeUnknown.of()
    if found is not None:
        return _Transient(found)
    return exc


def _transaction(
    db: pw.Database, *, write: bool, snapshot: bool
) -> contextlib.AbstractContextManager[object]:
    """The unit of work's transaction: none for a read without a snapshot; on SQLite a
    write's is BEGIN IMMEDIATE (the write lock up front), which gives way instead of
    waiting on the event loop (LoopTurn)."""
    if not snapshot:
        return _NOTHING
    if not (write and isinstance(db, pw.SqliteDatabase)) or _grouped.get() is not None:
        return db.atomic()  # in a group (LoopTurn.together), a savepoint of its transaction
    if not _turn_held.get():
        return db.atomic("IMMEDIATE")
    return _immediate_or_give_way(db)


@contextlib.contextmanager
def _immediate_or_give_way(db: pw.SqliteDatabase) -> Iterator[None]:
    """BEGIN IMMEDIATE with SQLite's busy timeout at 0 for that statement: when another
    process holds the file's write lock, WouldWait at once instead of a wait of up to
    --database-timeout (on the event loop, every call would wait with it)."""
    transaction = contextlib.ExitStack()
    db.execute_sql("PRAGMA busy_timeout = 0")
    try:
        transaction.enter_context(db.atomic("IMMEDIATE"))
    except pw.OperationalError as exc:
        if sqlite_busy(exc):
            raise callstate.WouldWait from exc
        raise
    finally:
        db.execute_sql(f"PRAGMA busy_timeout = {int(engine.timeouts().database * 1000)}")
    with transaction:
        yield


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


def _read_only(exc: BaseException) -> None:
    """Count a write refused by a database that accepts none; one log line (no
    traceback) at most every few seconds, as for a full disk."""
    count = read_only_events.record()
    if count is not None:
        why = _READ_ONLY_CAUSES.get(engine.kind(), _READ_ONLY_CAUSES["postgresql"])
        log.warning(
            "database read-only: it refused %d write(s) (%s; reads still work, writes "
            "resume once it accepts them): %s",
            count,
            why,
            first_line(exc),
        )


_READ_ONLY_CAUSES = {
    "sqlite": "the file system is read-only, or the file or its -wal/-shm files are not "
    "writable by this user",
    "postgresql": "a failover in progress, or the URL names a replica",
    "mysql": "a failover in progress, the server runs --read-only, or the URL names a replica",
}


class _Transient(Exception):
    """A database failure a retry can help with."""

    def __init__(self, found: Verdict):
        super().__init__(found.value)
        self.verdict = found


class _StaleConnection(_Transient):
    """A kept connection was found dead by the call's first use of it, before any
    COMMIT went out (_KeptConnection): the call runs once more, on a new connection."""


def savepoint() -> contextlib.AbstractContextManager[object]:
    """A nested transaction: a constraint error inside it leaves the outer one usable."""
    return proxy.atomic()


def statement_guard() -> contextlib.AbstractContextManager[object]:
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
    # peewee takes the locking clause as text too; its stubs declare only a bool.
    clause: Any = "LOCK IN SHARE MODE" if isinstance(db, pw.MySQLDatabase) else "FOR SHARE"
    return query.for_update(clause)


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
            attempt = 1
            in_line_since: float | None = None  # the first deadlock in line (in_line)
            while True:
                counted = _attempt.set(attempt)
                try:
                    if _observer is None:
                        with unit_of_work(write=write, snapshot=snapshot):
                            return fn(*args, **kwargs)
                    with (
                        _observer(fn.__name__, write, attempt),
                        unit_of_work(write=write, snapshot=snapshot),
                    ):
                        return fn(*args, **kwargs)
                except RunAgain:
                    if attempt == ATTEMPTS:
                        raise AssertionError(f"{fn.__name__} asked to run again") from None
                    log.debug("%s: run again, attempt %d", fn.__name__, attempt)
                except _StaleConnection as exc:
                    if attempt > 1:  # a new connection lost too: the database is away
                        raise DatabaseUnavailable.of() from exc.__cause__
                    log.debug("%s: kept connection lost, running again", fn.__name__)
                except _Transient as exc:
                    if exc.verdict is not Verdict.RETRY:
                        raise DatabaseUnavailable.of() from exc.__cause__
                    if getattr(exc.__cause__, "in_line", False):
                        now = time.monotonic()
                        in_line_since = in_line_since or now
                        if now - in_line_since < engine.timeouts().database:
                            log.debug("%s: deadlock in line, running again", fn.__name__)
                            time.sleep(random.uniform(0.001, 0.01))
                            continue  # no attempt spent
                    if attempt == ATTEMPTS:
                        raise DatabaseUnavailable.of() from exc.__cause__
                    log.debug("%s: deadlock, attempt %d, running again", fn.__name__, attempt)
                    time.sleep(random.uniform(0.001, 0.01 * attempt))
                finally:
                    _attempt.reset(counted)
                attempt += 1

        return wrapper

    return decorate
