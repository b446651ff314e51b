"""Commits of other server processes wake this one's watchers: PostgreSQL LISTEN/NOTIFY
(CommitListener), and on SQLite and MariaDB a cheap look, repeated, at something every
commit moves (Looks). listener() gives the one for a database URL.

PostgreSQL. A writing transaction with events sends NOTIFY on CHANNEL among its last
statements (outbox.py), so PostgreSQL delivers it when, and only if, the transaction
commits. Each server process keeps ONE connection of its own (not from the serving
pool) LISTENing on CHANNEL, in a thread of its own (not one of the unary pool's): a
notification of another process's commit only wakes the process's watch poller, which
then reads what is new with its usual query (its own commits wake it directly; their
notifications carry the process's token and are skipped).
So a notification carries nothing and losing one costs only latency: the poller still
looks every --watch-poll-interval seconds, which is the fallback while this connection
is down.

The connection LISTENs only while the process has watchers (want(), called by the
watch hub): a process with none would wake this thread for every commit anywhere, its
own included, to do nothing but take the GIL from the threads serving calls. The
connection itself stays open, so a first watcher waits for one LISTEN, not for a new
connection. Each time LISTEN starts the poller is woken once, for whatever committed
while nobody listened.

The connection is re-made after it breaks (the database restarted, the line was cut,
the backend was terminated), every `retry` seconds until it succeeds; each time it is
(re)made the poller is woken once, for whatever committed while nobody listened.

SQLite and MariaDB have no notifications. SQLite tells a connection whether any other
connection has committed since it last asked (`PRAGMA data_version`), across processes:
a look at the WAL's shared header, no table read. On MariaDB every commit with events
raises the feed's counter row (outbox.py): one primary-key read. Looks asks on a
connection of its own, every few tens of milliseconds (_LOOK_EVERY), while the process has
watchers (want(), as above), and wakes the poller when the answer moved, and once at
its first look, for what committed before. Its own process's commits move it too (they
come from other connections); the poller was woken for those already, and its extra
query finds nothing new. The --watch-poll-interval poll stays the fallback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import peewee as pw
import psycopg2

from enrollment.server.outage import Outage, first_line
from enrollment.server.periodic import Periodic
from enrollment.server.persistence import engine
from enrollment.server.persistence.models import SEQUENCE, EventCounter

CHANNEL = "enrollment_events"
# Its connections can be told from the serving pool's (application_name "enrollment").
APPLICATION_NAME = "enrollment-listen"

log = logging.getLogger("enrollment.watch")


_token: tuple[int, str] | None = None


def token() -> str:
    """What this process's notifications carry, so that its listener can skip them
    (its own commits wake its watchers directly, outbox.on_commit): made per process,
    also in a worker forked after the first call."""
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
    return _token[1]


# Seconds between Looks' looks, by kind of database: at most what another process's
# commit then waits for a watcher here (only while the process has watchers). MariaDB's
# look is a round trip away (_look).
_LOOK_EVERY = {"sqlite": 0.02, "mysql": 0.05}
_UNSEEN = object()  # Looks' answer before its first look since wanted
RETRY = 1.0  # seconds between tries to connect again, for CommitListener and Looks
# What their warning adds: what an outage of theirs costs.
_MEANWHILE = "watchers here see other processes' events at the next poll until it works again"


def _look(db: pw.Database) -> tuple[str, tuple[Any, ...]]:
    """What Looks asks db (an answer that moves when another connection commits)."""
    if isinstance(db, pw.SqliteDatabase):
        # The file's change counter, from the WAL's shared header; no table read.
        return "PRAGMA data_version", ()
    # The feed's counter, which every commit with events raises (outbox.py): a
    # primary-key read, compiled for db (the model is bound to the serving database).
    query = EventCounter.select(EventCounter.value).where(EventCounter.name == SEQUENCE)
    sql, params = db.get_sql_context().sql(query).query()
    return sql, tuple(params)


def listener(url: str, wake: Callable[[], None], *, timeout: float) -> CommitListener | Looks:
    """What tells this process of other processes' commits on url's database, calling
    wake (thread-safe, cheap) for them."""
    if engine.url_kind(url) == "postgresql":
        return CommitListener(url, wake, timeout=timeout)
    return Looks(url, wake, timeout=timeout)


class CommitListener:
    """LISTEN on CHANNEL; wake() (thread-safe, cheap) after each notification."""

    def __init__(
        self, url: str, wake: Callable[[], None], *, timeout: float, retry: float = RETRY
    ) -> None:
        self._url, self._wake = url, wake
        self._timeout, self._retry = timeout, retry
        # Written by want() and stop(): wakes the thread out of its select(). Closed by
        # stop() under the lock, so that a late want() never writes to its number
        # reused by then (a connection grpc accepted, a database socket).
        self._signal_read, self._signal_write = os.pipe()
        self._pipe_lock = threading.Lock()
        self._pipe_closed = False
        self._stopping = threading.Event()
        self.listening = threading.Event()  # set while a connection LISTENs
        self._outage = Outage(log, "change-feed listener", _MEANWHILE)
        self._wanted = False  # whether this process has watchers (want())
        self._thread = threading.Thread(target=self._run, name="feed-listen", daemon=True)

    def want(self, wanted: bool) -> None:
        """From any thread: LISTEN (True: the process has watchers) or not (False)."""
        if wanted != self._wanted:
            self._wanted = wanted
            self._poke(b"w")  # wakes the thread to LISTEN or UNLISTEN

    def _poke(self, byte: bytes) -> None:
        with self._pipe_lock, contextlib.suppress(OSError):
            if not self._pipe_closed:
                os.write(self._signal_write, byte)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stop_soon()
        self.join(self._timeout + 1)

    def stop_soon(self) -> None:
        """Tell the thread to stop, without waiting for it (join())."""
        self._stopping.set()
        self._poke(b"x")

    def join(self, timeout: float) -> None:
        # A database that hangs holds the thread inside LISTEN or UNLISTEN for good (its
        # statement timeout is its own): it is a daemon thread, left behind after this.
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            log.warning(
                "change-feed listener: the database does not answer; not waiting for it any longer"
            )
            return  # its pipe stays open: the thread still selects on it
        with self._pipe_lock:
            self._pipe_closed = True
            for fd in (self._signal_read, self._signal_write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        while not self._stopping.is_set():
            db = engine.open_probe(
                self._url, timeout=self._timeout, application_name=APPLICATION_NAME
            )
            try:
                db.connect()
                conn = db.connection()
                conn.autocommit = True
                self._outage.worked()
                self._listen(conn)
            except (pw.DatabaseError, pw.InterfaceError, psycopg2.Error, OSError) as exc:
                self._outage.failed(first_line(exc))
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    db.close()
            self._pause(self._retry)

    def _listen(self, conn: Any) -> None:
        while not self._stopping.is_set():
            wanted = self._wanted
            if wanted != self.listening.is_set():
                with conn.cursor() as cursor:
                    cursor.execute(f"{'' if wanted else 'UN'}LISTEN {CHANNEL}")
                if wanted:
                    self.listening.set()
                    self._wake()  # whatever committed while nobody listened
                else:
                    self.listening.clear()
            # Idle for long: TCP keepalives (engine.py) end a connection whose peer vanished.
            readable, _, _ = select.select([conn, self._signal_read], [], [], 60)
            if self._signal_read in readable:
                os.read(self._signal_read, 512)  # want() or stop(): the loop looks again
                continue
            if readable:
                conn.poll()  # raises when the connection broke
                mine = token()
                others = any(n.payload != mine for n in conn.notifies)
                conn.notifies.clear()
                if others and self.listening.is_set():
                    self._wake()

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self._signal_read], [], [], left)
            if readable:  # want() (the pause goes on) or stop()
                os.read(self._signal_read, 512)


class Looks(Periodic):
    """wake() when another connection (another process) has committed, told by a cheap
    look (_look) on a connection of its own every `interval` seconds while wanted:
    SQLite's data_version, MariaDB's event counter."""

    def __init__(self, url: str, wake: Callable[[], None], *, timeout: float) -> None:
        kind = engine.url_kind(url)
        super().__init__(f"feed-looks-{kind}", _LOOK_EVERY[kind])
        self._url, self._wake, self._timeout = url, wake, timeout
        self._wanted = threading.Event()  # the process has watchers (want())
        self._db: pw.Database | None = None
        self._cursor: Any = None  # the driver's, made once: a look runs one statement
        self._sql: tuple[str, tuple[Any, ...]] = ("", ())  # _look(self._db)
        self._last: Any = _UNSEEN  # the answer of the last look since wanted
        self._outage = Outage(log, "change-feed looks", _MEANWHILE)

    def want(self, wanted: bool) -> None:
        """From any thread: look (True: the process has watchers) or not (False)."""
        if wanted:
            self._wanted.set()
        else:
            self._wanted.clear()

    def interrupt(self) -> None:
        self._wanted.set()  # out of tick()'s wait: it sees it is stopping and looks no more

    def tick(self) -> None:
        if not self._wanted.is_set():
            self._last = _UNSEEN
            self._wanted.wait()  # no looks, no wake-ups, while nobody watches
            if self.stopping:
                return
        try:
            if self._cursor is None:
                self._db = engine.open_probe(self._url, timeout=self._timeout)
                self._sql = _look(self._db)
                self._cursor = self._db.cursor()  # connects
            with pw.__exception_wrapper__:  # type: ignore[attr-defined]  # the driver's errors as peewee's
                self._cursor.execute(*self._sql)
                found = self._cursor.fetchall()  # all: SQLite's statement then ends
        except (pw.DatabaseError, pw.InterfaceError, OSError) as exc:
            self._outage.failed(first_line(exc))  # the poll still looks meanwhile
            self._last = _UNSEEN
            self.finish()  # a new connection next round
            self.pause(RETRY)  # not a connection attempt per look while it is down
            return
        self._outage.worked()
        answer = found[0][0] if found else None  # MariaDB: no counter row before the first event
        if answer != self._last:
            # The first look since wanted wakes too: for what committed before it.
            self._wake()
        self._last = answer

    def finish(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = self._cursor = None
