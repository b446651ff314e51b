"""Opens the database named by a URL; runs each unit of work in one connection and transaction."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import peewee as pw
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import MaxConnectionsExceeded, PooledSqliteDatabase

from server.errors import DatabaseUnavailable
from server.models import database

P = ParamSpec("P")
R = TypeVar("R")

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    # WAL with synchronous=FULL: a committed call survives power loss.
    "synchronous": "full",
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


class DatabaseConfigError(ValueError):
    """The database URL cannot be used; the message is meant for the operator."""


def connect(
    url: str, *, max_connections: int = 32, timeout: float = 5.0, create: bool = False
) -> pw.Database:
    """Create the database for a URL (not yet connected) and bind the models to it.

    timeout: seconds a call waits for a pooled connection or for SQLite's write lock
    before it fails as UNAVAILABLE. create: whether a missing SQLite file may be
    created (only migrate does; a mistyped path elsewhere is an error, not a new file).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme != "sqlite":
        raise DatabaseConfigError(
            f"unsupported database URL scheme {scheme!r}: this release serves sqlite:///PATH"
        )
    path = parse_db_url(url).get("database") or ""
    if not path or path == ":memory:" or path.startswith("file:"):
        raise DatabaseConfigError("the SQLite URL must name a file, as in sqlite:///enrollment.db")
    if not Path(path).parent.is_dir():
        raise DatabaseConfigError(f"the directory of the SQLite file {path!r} does not exist")
    if not create and not Path(path).exists():
        raise DatabaseConfigError(
            f"the SQLite file {path!r} does not exist; `enrollment-server migrate` creates it"
        )
    db = PooledSqliteDatabase(
        path,
        pragmas={**SQLITE_PRAGMAS, "busy_timeout": int(timeout * 1000)},
        max_connections=max_connections,
        stale_timeout=None,
        timeout=timeout,
        check_same_thread=False,
    )
    database.initialize(db)
    return db


def is_transient(exc: BaseException) -> bool:
    """True when the failure is the database being unreachable, locked or out of time."""
    if isinstance(exc, MaxConnectionsExceeded | pw.InterfaceError):
        return True
    if isinstance(exc, pw.OperationalError | sqlite3.OperationalError):
        text = str(exc).lower()
        return any(marker in text for marker in _SQLITE_TRANSIENT)
    return False


# SQLite admits one writer at a time, and a writer that finds the file locked polls with
# sleeps of up to 100 ms: under 16 concurrent writers that made a 300 ms p99. Writers of
# one process queue on this lock instead; only other processes meet the busy timeout.
_sqlite_writer = threading.Lock()


@contextlib.contextmanager
def _writer_turn(write: bool) -> Iterator[None]:
    if not (write and _is_sqlite()):
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
    """One connection and one transaction; writers take SQLite's write lock up front."""
    try:
        with _writer_turn(write), database.connection_context():
            begin = ("IMMEDIATE",) if write and _is_sqlite() else ()
            with database.atomic(*begin):
                yield
    except (pw.DatabaseError, pw.InterfaceError, MaxConnectionsExceeded) as exc:
        if is_transient(exc):
            raise DatabaseUnavailable.of() from exc
        raise


def savepoint():
    """A nested transaction: a constraint error inside it leaves the outer one usable."""
    return database.atomic()


def transactional(*, write: bool) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated service function as one unit of work."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with unit_of_work(write=write):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _is_sqlite() -> bool:
    return isinstance(database.obj, pw.SqliteDatabase)


def close() -> None:
    """Close every pooled connection (at shutdown)."""
    db = database.obj
    if db is None:
        return
    if hasattr(db, "close_all"):
        db.close_all()
    else:
        db.close()
