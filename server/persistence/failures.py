"""Sorts database failures: a deadlock victim to run again, a database that is not
available now, or anything else (a bug or a schema mismatch)."""

from __future__ import annotations

import enum
import sqlite3
import threading
import time

import peewee as pw
import psycopg2
import psycopg2.errors
import pymysql
from playhouse.pool import MaxConnectionsExceeded

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
# So is a prepared statement the session lost (invalid_sql_statement_name: a pooler in
# transaction mode): the pool stops preparing when it sees one (engine.py), so the
# transaction runs again with its statements plain.
_PG_RETRY_CODES = ("40001", "40P01", "26000")
# MySQL/MariaDB error numbers: the connection is gone (can't connect, server gone,
# lost, killed, closed for inactivity), and the other "not now"s (too many connections,
# shutting down, lock wait timeout, statement time limit).
_MYSQL_LOST = {1927, 2002, 2003, 2006, 2013, 2055, 4031}
# A new connection's login refused while serving: access denied (1044, 1045, 1698), unknown
# database (1049), host blocked or not allowed (1129, 1130), the account's connection
# or resource limits (1203, 1226), its password expired (1820, 1862), the account
# locked (4151). An operator's change (a rotated password, a locked account) that the
# operator can undo: PostgreSQL's refused login is a connection failure too.
_MYSQL_LOGIN_REFUSED = {1044, 1045, 1049, 1129, 1130, 1203, 1226, 1698, 1820, 1862, 4151}
_MYSQL_TRANSIENT = _MYSQL_LOST | _MYSQL_LOGIN_REFUSED | {1040, 1053, 1205, 1969, 3024}
_MYSQL_RETRY = {1213}  # deadlock found when trying to get lock
# No space left for the write: SQLite's SQLITE_FULL ("database or disk is full"),
# PostgreSQL's disk_full, MariaDB's "disk full" (1021) and "table is full" (1114).
_SQLITE_FULL = 13
_PG_FULL_CODES = ("53100",)
_MYSQL_FULL = {1021, 1114}
# The database accepts no writes: PostgreSQL's read_only_sql_transaction (a hot standby,
# default_transaction_read_only), MariaDB's "running with --read-only" (1290), "in a
# READ ONLY transaction" (1792) and "table is read only" (1036, innodb_read_only),
# SQLite's SQLITE_READONLY (a file system remounted read-only, a read-only file).
_PG_READ_ONLY_CODES = ("25006",)
_MYSQL_READ_ONLY = {1036, 1290, 1792}
_SQLITE_READONLY = 8


class Verdict(enum.Enum):
    """What a failed transaction means for the call."""

    RETRY = "retry"  # a deadlock victim: its transaction was rolled back whole, run it again
    UNAVAILABLE = "unavailable"  # down, locked or out of time: the caller may retry
    FULL = "full"  # no space left for the write: nothing changed, retry once space is freed
    READ_ONLY = "read-only"  # the database accepts no writes now (a failover, a replica)


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception behind peewee's wrapper (peewee keeps it as .orig)."""
    return getattr(exc, "orig", None) or exc


def classify(exc: BaseException) -> Verdict | None:
    """RETRY for a deadlock victim, FULL for storage with no space left, READ_ONLY for a
    database that accepts no writes, UNAVAILABLE for a database that is down, locked or
    out of time, None for anything else (a bug or a schema mismatch)."""
    if isinstance(exc, MaxConnectionsExceeded | pw.InterfaceError):
        return Verdict.UNAVAILABLE
    if not isinstance(exc, pw.DatabaseError | sqlite3.Error):
        return None
    if storage_full(exc):
        return Verdict.FULL
    cause = _driver_error(exc)
    pgcode = getattr(cause, "pgcode", None)
    if isinstance(cause, psycopg2.Error):
        if pgcode in _PG_READ_ONLY_CODES:
            return Verdict.READ_ONLY
        if pgcode in _PG_RETRY_CODES:
            return Verdict.RETRY
        if pgcode is None:
            # No SQLSTATE: the client lost or never had the connection.
            return Verdict.UNAVAILABLE if isinstance(exc, pw.OperationalError) else None
        if pgcode[:2] in _PG_TRANSIENT_CLASSES or pgcode in _PG_TRANSIENT_CODES:
            return Verdict.UNAVAILABLE
        return None
    if isinstance(cause, pymysql.Error):
        errno = _mysql_errno(cause)
        if errno in _MYSQL_READ_ONLY:
            return Verdict.READ_ONLY
        if errno in _MYSQL_RETRY:
            return Verdict.RETRY
        if errno in _MYSQL_TRANSIENT or isinstance(cause, pymysql.InterfaceError):
            return Verdict.UNAVAILABLE
        return None
    if _sqlite_code(cause) == _SQLITE_READONLY:
        return Verdict.READ_ONLY
    if isinstance(exc, pw.OperationalError | sqlite3.OperationalError):
        text = str(exc).lower()
        if any(marker in text for marker in _SQLITE_TRANSIENT):
            return Verdict.UNAVAILABLE
    return None


def verdict(exc: BaseException) -> Verdict | None:
    """classify for an error and the errors it was raised while handling: MariaDB rolls
    a deadlock victim's whole transaction back, so leaving the savepoint then fails
    with "SAVEPOINT does not exist", and the deadlock is what happened."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        found = classify(current)
        if found is not None:
            return found
        current, seen = current.__context__, seen + 1
    return None


def storage_full(exc: BaseException) -> bool:
    """The database refused a write for want of space (disk, file system or table full)."""
    cause = _driver_error(exc)
    if isinstance(cause, psycopg2.Error):
        # psycopg2 raises DiskFull for 53100 (its instances made elsewhere have no pgcode).
        pgcode = getattr(cause, "pgcode", None)
        return pgcode in _PG_FULL_CODES or isinstance(cause, psycopg2.errors.DiskFull)
    if isinstance(cause, pymysql.Error):
        return _mysql_errno(cause) in _MYSQL_FULL
    code = _sqlite_code(cause)
    if code is not None:
        return code == _SQLITE_FULL
    return "database or disk is full" in str(exc).lower()


_SQLITE_BUSY = 5


def sqlite_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY: another connection holds the lock the statement needed ("database is
    locked"), and the busy timeout ran out."""
    code = _sqlite_code(_driver_error(exc))
    if code is not None:
        return code == _SQLITE_BUSY
    return "database is locked" in str(exc).lower()


def _sqlite_code(cause: BaseException) -> int | None:
    """The primary result code of a sqlite3 error (Python 3.11+ gives the extended one)."""
    code = getattr(cause, "sqlite_errorcode", None)
    if isinstance(cause, sqlite3.Error) and code is not None:
        return int(code) & 0xFF
    return None


class Occurrences:
    """Counts a condition (for metrics) and says when it is worth one more log line:
    at most one line per `every` seconds, telling how many were not logged."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._lock = threading.Lock()
        self.total = 0
        self._unlogged = 0
        self._logged_at = float("-inf")

    def record(self) -> int | None:
        """Count one; the number of occurrences the log line should stand for, or None
        when a line was written less than `every` seconds ago."""
        now = time.monotonic()
        with self._lock:
            self.total += 1
            self._unlogged += 1
            if now - self._logged_at < self.every:
                return None
            self._logged_at, count, self._unlogged = now, self._unlogged, 0
            return count


# Writes refused for want of space, since the process started (metrics read .total).
storage_full_events = Occurrences(every=10.0)
# Writes refused by a database that accepts none (read-only), likewise.
read_only_events = Occurrences(every=10.0)


def _mysql_errno(cause: BaseException) -> int | None:
    return cause.args[0] if cause.args and isinstance(cause.args[0], int) else None


def lost_connection(exc: BaseException) -> bool:
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


def may_have_committed(exc: BaseException) -> bool:
    """A statement that ended with COMMIT failed: whether the COMMIT may have run. The
    database answering with an error means it did not (the statement failed before
    it, or the COMMIT itself failed), except a cancel (57014: a statement timeout or
    pg_cancel_backend), which can land just after the commit; a lost answer may hide
    either outcome."""
    cause = _driver_error(exc)
    return lost_connection(exc) or getattr(cause, "pgcode", None) == "57014"
