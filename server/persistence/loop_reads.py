"""PostgreSQL's one-statement reads, driven by the event loop on connections of its own.

A read handed to a pool thread costs this process about twice the CPU of the same read
driven by the loop (`make bench-handoff`: the hand-over, the GIL going back and forth,
the thread's wake-ups; bench/PROFILE.md, "eighteenth session"). So on PostgreSQL the
reads that are one statement (persistence/steps.py; GetStudent, GetCourse, ListStudents,
ListCourses) run here: a few psycopg2 connections in asynchronous mode, each socket
watched by the loop. A read takes a free connection (or waits in line for one, as a
coroutine), sends its statement, and the loop reads the answer when it is there; no
thread is involved, and the loop serves other calls meanwhile.

What a read here keeps from a unit of work (persistence/unit_of_work.py):
- the connections have the pool's settings (the same driver parameters: the statement
  and lock timeouts of --database-timeout, keepalives, application_name), are counted
  in --pool-size, and are opened in a thread (a blocking connect, with the pool's
  connect_timeout), never on the loop;
- each statement is its own snapshot (asynchronous connections are in autocommit), as a
  unit of work with snapshot=False runs it;
- a read does not start when its call has already ended (CallEnded);
- failures as a unit of work maps them (unit_of_work.failed_read): a database that is
  away, out of time or refusing connections answers UNAVAILABLE, and a lost connection
  drops the pool's idle ones with it; a connection that had answered before and is
  found dead by the read's statement is dropped and the read runs once more on a new
  one (nothing was written, nothing can have committed); a new one lost too is
  UNAVAILABLE. A deadlock cannot pick a read that takes no lock, so none is retried
  for that;
- a call that waits longer than --pool-timeout for a free connection is UNAVAILABLE,
  as the pool's would be;
- a call cancelled while its statement runs leaves the statement to finish: its answer
  is read and thrown away, and the connection goes back to the free ones.

Only on the event loop (create it there); close() at shutdown, after the grace period.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
from collections.abc import Callable
from typing import Any, TypeVar

import peewee as pw
import psycopg2
import psycopg2.extensions

from enrollment.server.errors import CallEnded, DatabaseUnavailable
from enrollment.server.persistence.failures import lost_connection
from enrollment.server.persistence.steps import Steps
from enrollment.server.persistence.unit_of_work import failed_read

R = TypeVar("R")

log = logging.getLogger("enrollment.db")

_POLL_OK = psycopg2.extensions.POLL_OK
_POLL_WRITE = psycopg2.extensions.POLL_WRITE
_POLL_READ = psycopg2.extensions.POLL_READ
_DATABASE_ERRORS = (pw.DatabaseError, pw.InterfaceError)
# The driver's errors as peewee's, the driver's kept as .orig: what a unit of work
# sees, and what failures.py reads (as engine.py and notify.py do).
_AS_PEEWEE = pw.__exception_wrapper__  # type: ignore[attr-defined]


class _Lane:
    """One asynchronous connection, and the answer it is reading (None: free or idle)."""

    __slots__ = ("answer", "connection", "cursor", "fd", "used", "writing")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.cursor = connection.cursor()
        self.fd: int = connection.fileno()
        self.answer: asyncio.Future[list[tuple[Any, ...]]] | None = None
        self.used = False  # has answered a read: it may have died since (a stale lane)
        self.writing = False  # the loop waits for its socket to take the rest of a query


class _Stale(Exception):
    """A lane that had answered before was found dead by a read's statement."""


class LoopReads:
    """Up to `size` asynchronous connections to the PostgreSQL database db (the serving
    pool: its driver parameters), on the running loop. wait: seconds a read waits for a
    free connection (--pool-timeout)."""

    def __init__(self, db: pw.PostgresqlDatabase, size: int, *, wait: float) -> None:
        if size < 1:
            raise ValueError("LoopReads needs at least one connection")
        self._db = db
        self._size = size
        self._wait = wait
        self._loop = asyncio.get_running_loop()
        self._lanes: set[_Lane] = set()  # open
        self._free: collections.deque[_Lane] = collections.deque()
        self._waiting: collections.deque[asyncio.Future[_Lane]] = collections.deque()
        self._connecting = 0
        self._closed = False

    def open_connections(self) -> int:
        return len(self._lanes)

    async def run(self, steps_of: Callable[[], Steps[R]], is_active: Callable[[], bool]) -> R:
        """Drive a read's steps (steps_of() makes them afresh for a second attempt) on
        this loop's connections; is_active: whether the call is still wanted."""
        for attempt in (1, 2):
            try:
                return await self._drive(steps_of(), is_active, last=attempt == 2)
            except _Stale:
                log.debug("a read's connection was lost while idle, running it again")
        raise AssertionError("unreachable")

    async def _drive(self, steps: Steps[R], is_active: Callable[[], bool], *, last: bool) -> R:
        try:
            query, values = next(steps)
            while True:
                if not is_active():
                    raise CallEnded.of()
                sql, params = query.statement(values)
                lane = self._free.popleft() if self._free else await self._next_lane()
                reused = lane.used
                try:
                    fetched = await self._ask(lane, sql, params)
                except _DATABASE_ERRORS as exc:
                    failure = failed_read(exc)
                    if failure is exc:
                        raise
                    if reused and not last and lost_connection(exc):
                        raise _Stale from exc
                    raise failure from exc
                query, values = steps.send(query.made(fetched))
        except StopIteration as done:
            result: R = done.value
            return result

    async def _next_lane(self) -> _Lane:
        """A free connection, once one is (a new one is opened while fewer than size
        are); DatabaseUnavailable after `wait` seconds, or when none could be opened."""
        if self._closed:
            raise DatabaseUnavailable.of()
        waiter: asyncio.Future[_Lane] = self._loop.create_future()
        self._waiting.append(waiter)
        self._refill()
        timer = self._loop.call_later(self._wait, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a connection just as the call was cancelled: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise
        finally:
            timer.cancel()

    async def _ask(self, lane: _Lane, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Send the statement on lane; its rows once the loop has read them. The lane is
        released (or dropped) by whoever reads the answer, even if this call is
        cancelled meanwhile."""
        answer: asyncio.Future[list[tuple[Any, ...]]] = self._loop.create_future()
        lane.answer = answer
        try:
            with _AS_PEEWEE:
                lane.cursor.execute(sql, params)
        except BaseException as exc:
            # Nothing was sent (or the connection is gone): no answer to wait for.
            lane.answer = None
            if lane.connection.closed or lost_connection(exc):
                self._drop(lane)
            else:
                self._release(lane)
            raise
        # The answer may be here already: libpq reads what has come while it flushes.
        self._advance(lane)
        return await answer

    def _advance(self, lane: _Lane) -> None:
        """The lane's socket is ready (or a statement was just sent): read what has come."""
        fetched: list[tuple[Any, ...]] = []
        try:
            with _AS_PEEWEE:
                state = lane.connection.poll()
                answered = state == _POLL_OK and lane.answer is not None
                if answered and lane.cursor.description is not None:
                    fetched = lane.cursor.fetchall()
        except Exception as exc:
            self._failed(lane, exc)
            return
        if state == _POLL_WRITE:
            if not lane.writing:  # a query larger than the socket's buffer
                lane.writing = True
                self._loop.add_writer(lane.fd, self._advance, lane)
            return
        if lane.writing:
            lane.writing = False
            self._loop.remove_writer(lane.fd)
        if state != _POLL_OK or lane.answer is None:
            return  # more to come; or an idle connection's notice, consumed
        answer, lane.answer = lane.answer, None
        lane.used = True
        if not answer.done():  # else its call was cancelled: the answer is thrown away
            answer.set_result(fetched)
        self._release(lane)

    def _failed(self, lane: _Lane, exc: BaseException) -> None:
        """The lane's statement (or, idle, its connection) failed with exc."""
        answer, lane.answer = lane.answer, None
        lost = bool(lane.connection.closed) or lost_connection(exc)
        if lost:
            self._drop(lane)
        if answer is None:
            return
        if not answer.done():
            answer.set_exception(exc)
        if not lost:  # the statement failed, the connection did not: it serves on
            self._release(lane)

    def _release(self, lane: _Lane) -> None:
        """A connection free again: to the first call still waiting, or the free ones."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(lane)
                return
        self._free.append(lane)

    def _drop(self, lane: _Lane) -> None:
        """Close a connection that is lost (or at shutdown)."""
        if lane not in self._lanes:
            return
        self._lanes.discard(lane)
        with contextlib.suppress(ValueError):
            self._free.remove(lane)
        self._loop.remove_reader(lane.fd)
        if lane.writing:
            self._loop.remove_writer(lane.fd)
        with contextlib.suppress(Exception):
            lane.connection.close()
        self._refill()

    def _refill(self) -> None:
        """Open connections for the calls waiting, while fewer than size are open."""
        while not self._closed and len(self._lanes) + self._connecting < self._size:
            wanted = sum(1 for waiter in self._waiting if not waiter.done())
            if self._connecting >= wanted:
                return
            self._connecting += 1
            made = self._loop.run_in_executor(None, self._connect)
            made.add_done_callback(self._connected)

    def _connect(self) -> Any:
        """In a thread: a new asynchronous connection, started."""
        db = self._db
        params = dict(db.connect_params)
        timeout = float(params.get("connect_timeout") or 10)
        with _AS_PEEWEE:
            connection = psycopg2.connect(database=db.database, async_=1, **params)
            try:
                _wait_connected(connection, timeout)
            except BaseException:
                connection.close()
                raise
        return connection

    def _connected(self, made: asyncio.Future[Any]) -> None:
        self._connecting -= 1
        if made.cancelled():  # the loop is closing
            return
        exc = made.exception()
        if exc is None:
            connection = made.result()
            if self._closed:
                connection.close()
                return
            lane = _Lane(connection)
            self._lanes.add(lane)
            self._loop.add_reader(lane.fd, self._advance, lane)
            self._release(lane)
            return
        failure = failed_read(exc) if isinstance(exc, _DATABASE_ERRORS) else exc
        # The first call still waiting fails with it (as a call whose pooled connection
        # could not be opened does); the others try again.
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(failure)
                break
        self._refill()

    def close(self) -> None:
        """Close every connection; a read still running or waiting fails UNAVAILABLE."""
        self._closed = True
        for lane in list(self._lanes):
            answer, lane.answer = lane.answer, None
            if answer is not None and not answer.done():
                answer.set_exception(DatabaseUnavailable.of())
            self._drop(lane)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(DatabaseUnavailable.of())


def _expire(waiter: asyncio.Future[_Lane]) -> None:
    if not waiter.done():
        waiter.set_exception(DatabaseUnavailable.of())


def _wait_connected(connection: Any, timeout: float) -> None:
    """An asynchronous connection's start, waited for in this (non-loop) thread."""
    while (state := connection.poll()) != _POLL_OK:
        socket = [connection.fileno()]
        if state == _POLL_READ:
            ready = select.select(socket, [], [], timeout)[0]
        else:
            ready = select.select([], socket, [], timeout)[1]
        if not ready:
            raise psycopg2.OperationalError(f"timeout expired after {timeout:g} s")
