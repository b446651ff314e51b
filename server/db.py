"""Opens the database named by a URL; runs each unit of work in one connection and transaction."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import peewee as pw
import psycopg2
import pymysql
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import (
    MaxConnectionsExceeded,
    PooledMySQLDatabase,
    PooledPostgresqlDatabase,
    PooledSqliteDatabase,
)

from server import callstate
from server.errors import DatabaseUnavailable
from server.models import database

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("enrollment.db")

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    # WAL with synchronous=FULL: a committed call survives power loss.
    "synchronous": "full",
}

SCHEMES = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}

# SQLite says these when the file is locked by another writer or cannot be reached;
# a retry can help. Anything else (a missing table, a constraint) is a bug or a
# schema mismatch and leaves as INTERNAL.
_SQLITE_TRANSIENT = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "unable to open database file",
    "disk i/o error",
)
# PostgreSQL SQLSTATEs (and classes) that mean "not now": connection failures (08),
# insufficient resources (53), operator intervention (57: shutdown, statement or lock
# timeout), lock not available (55P03).
_PG_TRANSIENT_CLASSES = ("08", "53", "57")
_PG_TRANSIENT_CODES = ("55P03",)
# A deadlock or a serialization failure: running the whole transaction again is safe.
_PG_RETRY_CODES = ("40001", "40P01")
# MySQL/MariaDB error numbers: the connection is gone (can't connect, server gone,
# lost, killed, closed for inactivity), and the other "not now"s (too many connections,
# shutting down, lock wait timeout, statement time limit).
_MYSQL_LOST = {1927, 2002, 2003, 2006, 2013, 2055, 4031}
_MYSQL_TRANSIENT = _MYSQL_LOST | {1040, 1053, 1205, 1969, 3024}
_MYSQL_RETRY = {1213}  # deadlock found when trying to get lock

# A transaction chosen as a deadlock victim is run again this many times in all.
ATTEMPTS = 3


class DatabaseConfigError(ValueError):
    """The database URL cannot be used; the message is meant for the operator."""


@dataclass(frozen=True)
class Target:
    """Where a URL points: the kind of database and how to open a connection to it."""

    kind: str  # "sqlite", "postgresql" or "mysql"
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.params.get("database", ""))


def parse(url: str, *, create: bool = False) -> Target:
    """Check a database URL and split it into kind and driver parameters."""
    scheme = url.split(":", 1)[0].lower()
    kind = SCHEMES.get(scheme)
    if kind is None:
        raise DatabaseConfigError(
            f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH, "
            "postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB"
        )
    try:
        params = parse_db_url(url, unquote_password=True, unquote_user=True)
    except ValueError as exc:  # a port that is not a number
        raise DatabaseConfigError(f"the database URL cannot be read: {exc}") from None
    if kind == "sqlite":
        _check_sqlite_path(params.get("database") or "", create=create)
    elif not params.get("database"):
        raise DatabaseConfigError(f"the {kind} URL must name a database, as in {scheme}://HOST/DB")
    if "passwd" in params:
        params["password"] = params.pop("passwd")
    return Target(kind, params)


def _check_sqlite_path(path: str, *, create: bool) -> None:
    if not path or path == ":memory:" or path.startswith("file:"):
        raise DatabaseConfigError("the SQLite URL must name a file, as in sqlite:///enrollment.db")
    if not Path(path).parent.is_dir():
        raise DatabaseConfigError(f"the directory of the SQLite file {path!r} does not exist")
    if not create and not Path(path).exists():
        raise DatabaseConfigError(
            f"the SQLite file {path!r} does not exist; `enrollment-server migrate` creates it"
        )


def _driver_params(target: Target, timeout: float, statement_timeout: float | None) -> dict:
    """Connection parameters that make every wait end: connecting, locks, statements.

    statement_timeout None (schema commands) lets a long migration run to its end.
    """
    params = dict(target.params)
    whole_seconds = max(1, math.ceil(timeout))
    if target.kind == "sqlite":
        params.pop("database")
        params.setdefault("pragmas", {**SQLITE_PRAGMAS, "busy_timeout": int(timeout * 1000)})
        params.setdefault("check_same_thread", False)
    elif target.kind == "postgresql":
        options = [f"-c lock_timeout={int(timeout * 1000)}"]
        if statement_timeout is not None:
            options.append(f"-c statement_timeout={int(statement_timeout * 1000)}")
        params.pop("database")
        params.setdefault("connect_timeout", whole_seconds)
        params.setdefault("application_name", "enrollment")
        params.setdefault("options", " ".join(options))
        # A peer that vanishes without a word (a cut cable, a dead host) is noticed
        # within a few seconds rather than after the kernel's 15-minute default.
        params.setdefault("keepalives_idle", whole_seconds)
        params.setdefault("keepalives_interval", 1)
        params.setdefault("keepalives_count", 3)
        params.setdefault("tcp_user_timeout", int(whole_seconds * 2000))
    else:
        # READ COMMITTED, as on PostgreSQL: every statement sees what is committed, and
        # the locking statements decide races the same way on both databases.
        session = f"SET SESSION innodb_lock_wait_timeout = {whole_seconds}"
        if statement_timeout is not None:
            session += f", SESSION max_statement_time = {statement_timeout:.3f}"
        params.pop("database")
        params.setdefault("charset", "utf8mb4")
        params.setdefault("connect_timeout", whole_seconds)
        params.setdefault("init_command", "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        params["session_sql"] = session
        # A server that stops answering mid-query is given up on.
        limit = whole_seconds * 2 + (statement_timeout or 0)
        params.setdefault("read_timeout", limit if statement_timeout is not None else None)
        params.setdefault("write_timeout", whole_seconds * 2)
    return params


class _MySQLSession:
    """Runs session settings on every new connection (pymysql's init_command takes one
    statement, and the isolation level needs its own)."""

    def __init__(self, *args, session_sql: str = "", **kwargs):
        self._session_sql = session_sql
        super().__init__(*args, **kwargs)

    def _initialize_connection(self, conn):
        # peewee calls this at every checkout from the pool; the settings need one
        # round trip per new connection only.
        super()._initialize_connection(conn)
        if self._session_sql and not getattr(conn, "enrollment_session", False):
            with conn.cursor() as cursor:
                cursor.execute(self._session_sql)
            conn.enrollment_session = True


class PooledMariaDBDatabase(_MySQLSession, PooledMySQLDatabase):
    """The serving pool for mysql:// URLs (MariaDB or MySQL) with the session settings."""


class MariaDBDatabase(_MySQLSession, pw.MySQLDatabase):
    """One unpooled connection with the same settings (health probes, tests)."""


_POOLED = {
    "sqlite": PooledSqliteDatabase,
    "postgresql": PooledPostgresqlDatabase,
    "mysql": PooledMariaDBDatabase,
}
_PLAIN = {
    "sqlite": pw.SqliteDatabase,
    "postgresql": pw.PostgresqlDatabase,
    "mysql": MariaDBDatabase,
}


def connect(
    url: str,
    *,
    max_connections: int = 32,
    timeout: float = 5.0,
    pool_timeout: float | None = None,
    statement_timeout: float | None = None,
    create: bool = False,
) -> pw.Database:
    """Create the pooled database for a URL (not yet connected) and bind the models to it.

    timeout: seconds a call waits for a new connection or a lock before it fails as
    UNAVAILABLE. pool_timeout: seconds it waits for a free pooled connection (default
    timeout). statement_timeout: seconds one statement may run (None: no limit).
    create: whether a missing SQLite file may be created (only migrate does; a
    mistyped path elsewhere is an error, not a new file).
    """
    target = parse(url, create=create)
    db = _POOLED[target.kind](
        target.name,
        max_connections=max_connections,
        stale_timeout=None,
        timeout=timeout if pool_timeout is None else pool_timeout,
        **_driver_params(target, timeout, statement_timeout),
    )
    database.initialize(db)
    return db


def probe_database(url: str, *, timeout: float) -> pw.Database:
    """An unpooled database for health probes: its failures never touch the RPC pool."""
    target = parse(url)
    return _PLAIN[target.kind](target.name, **_driver_params(target, timeout, timeout))


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception behind peewee's wrapper (peewee keeps it as .orig)."""
    return getattr(exc, "orig", None) or exc


def _classify(exc: BaseException) -> str | None:
    """'retry' for a deadlock victim, 'unavailable' for a database that is down, locked,
    full or out of time, None for anything else (a bug or a schema mismatch)."""
    if isinstance(exc, MaxConnectionsExceeded | pw.InterfaceError):
        return "unavailable"
    if not isinstance(exc, pw.DatabaseError | sqlite3.Error):
        return None
    cause = _driver_error(exc)
    pgcode = getattr(cause, "pgcode", None)
    if isinstance(cause, psycopg2.Error):
        if pgcode in _PG_RETRY_CODES:
            return "retry"
        if pgcode is None:
            # No SQLSTATE: the client lost or never had the connection.
            return "unavailable" if isinstance(exc, pw.OperationalError) else None
        if pgcode[:2] in _PG_TRANSIENT_CLASSES or pgcode in _PG_TRANSIENT_CODES:
            return "unavailable"
        return None
    if isinstance(cause, pymysql.Error):
        errno = _mysql_errno(cause)
        if errno in _MYSQL_RETRY:
            return "retry"
        if errno in _MYSQL_TRANSIENT or isinstance(cause, pymysql.InterfaceError):
            return "unavailable"
        return None
    if isinstance(exc, pw.OperationalError | sqlite3.OperationalError):
        text = str(exc).lower()
        if any(marker in text for marker in _SQLITE_TRANSIENT):
            return "unavailable"
    return None


def _verdict(exc: BaseException) -> str | None:
    """_classify for an error and the errors it was raised while handling: MariaDB rolls
    a deadlock victim's whole transaction back, so leaving the savepoint then fails
    with "SAVEPOINT does not exist", and the deadlock is what happened."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current, seen = current.__context__, seen + 1
    return None


def _mysql_errno(cause: BaseException) -> int | None:
    return cause.args[0] if cause.args and isinstance(cause.args[0], int) else None


def _lost_connection(exc: BaseException) -> bool:
    """The connection itself failed (not a lock or a timeout inside a working session)."""
    cause = _driver_error(exc)
    if isinstance(exc, pw.InterfaceError):
        return True
    pgcode = getattr(cause, "pgcode", "") or ""
    if isinstance(cause, psycopg2.Error):
        return not pgcode or pgcode.startswith(("08", "57P"))
    if isinstance(cause, pymysql.Error):
        errno = _mysql_errno(cause)
        return errno is None or errno in _MYSQL_LOST
    return False


# SQLite admits one writer at a time, and a writer that finds the file locked polls with
# sleeps of up to 100 ms: under 16 concurrent writers that made a 300 ms p99. Writers of
# one process queue on this lock instead; only other processes meet the busy timeout.
_sqlite_writer = threading.Lock()


@contextlib.contextmanager
def _writer_turn(write: bool) -> Iterator[None]:
    if not (write and isinstance(database.obj, pw.SqliteDatabase)):
        yield
        return
    timeout = getattr(database.obj, "_wait_timeout", 5.0)  # the pool's, from --database-timeout
    if not _sqlite_writer.acquire(timeout=timeout if timeout != float("inf") else -1):
        raise DatabaseUnavailable.of()
    try:
        yield
    finally:
        _sqlite_writer.release()


@contextlib.contextmanager
def unit_of_work(*, write: bool) -> Iterator[None]:
    """One connection and one transaction; writers take SQLite's write lock up front.

    A call whose deadline passed or that was cancelled does not start, and does not
    commit: CallEnded raised before the commit rolls the transaction back.
    """
    callstate.ensure_active()
    db = database.obj
    try:
        with database.connection_context(), _writer_turn(write):
            begin = ("IMMEDIATE",) if write and isinstance(db, pw.SqliteDatabase) else ()
            with database.atomic(*begin):
                yield
                callstate.ensure_active()
    except (pw.DatabaseError, pw.InterfaceError, MaxConnectionsExceeded) as exc:
        verdict = _verdict(exc)
        if verdict == "unavailable" and _lost_connection(exc):
            # The idle connections went down with this one: drop them now, so the
            # calls after an outage open fresh connections instead of failing one by one.
            discard_idle()
        if verdict is not None:
            raise _Transient(verdict) from exc
        raise


class _Transient(Exception):
    """A database failure a retry can help with; verdict: 'retry' or 'unavailable'."""

    def __init__(self, verdict: str):
        super().__init__(verdict)
        self.verdict = verdict


def discard_idle() -> None:
    """Close the pool's idle connections (after an outage they are all dead)."""
    close_idle = getattr(database.obj, "close_idle", None)
    if close_idle is not None:
        with contextlib.suppress(Exception):
            close_idle()


def savepoint():
    """A nested transaction: a constraint error inside it leaves the outer one usable."""
    return database.atomic()


def locking(query: pw.Select) -> pw.Select:
    """SELECT … FOR UPDATE where the database has it. SQLite needs none: a writer there
    holds the whole database from BEGIN IMMEDIATE on."""
    return query if isinstance(database.obj, pw.SqliteDatabase) else query.for_update()


def transactional(*, write: bool) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated service function as one unit of work; a deadlock victim is run
    again from the start (its transaction was rolled back whole), up to ATTEMPTS times."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    with unit_of_work(write=write):
                        return fn(*args, **kwargs)
                except _Transient as exc:
                    if exc.verdict != "retry" or attempt == ATTEMPTS:
                        raise DatabaseUnavailable.of() from exc.__cause__
                    log.debug("%s: deadlock, attempt %d, running again", fn.__name__, attempt)
                    time.sleep(random.uniform(0.001, 0.01 * attempt))
            raise AssertionError("unreachable")

        return wrapper

    return decorate


def ping(db: pw.Database) -> None:
    """Run SELECT 1 on db (connecting when needed); raises when the database is down."""
    try:
        if db.is_closed():
            db.connect()
        db.execute_sql("SELECT 1").fetchone()
    except BaseException:
        with contextlib.suppress(Exception):
            db.close()
        raise


def connections_in_use() -> int:
    """Pooled connections checked out right now (0 for a database without a pool)."""
    return len(getattr(database.obj, "_in_use", ()) or ())


def close() -> None:
    """Close every pooled connection (at shutdown)."""
    db = database.obj
    if db is None:
        return
    if hasattr(db, "close_all"):
        db.close_all()
    else:
        db.close()
