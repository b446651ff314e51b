"""Opens the database a URL names: the serving pool, the health probe's connection, closing."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import peewee as pw
import psycopg2
import psycopg2.extensions
import pymysql
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

from enrollment.server.outage import first_line
from enrollment.server.persistence.checkpoint import AUTOCHECKPOINT_PAGES
from enrollment.server.persistence.models import proxy

log = logging.getLogger("enrollment.db")

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    # WAL with synchronous=FULL: a committed call survives power loss.
    "synchronous": "full",
    # A safety net only: the serving process checkpoints in the background
    # (persistence/checkpoint.py), off the write path.
    "wal_autocheckpoint": AUTOCHECKPOINT_PAGES,
}

SCHEMES = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}


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


def scheme_kind(url: str) -> str | None:
    """The kind of database a URL's scheme names ("sqlite", "postgresql" or "mysql"),
    None for a scheme not supported; nothing else of the URL is checked."""
    return SCHEMES.get(url.split(":", 1)[0].lower())


def url_kind(url: str) -> str:
    """The kind of database a URL names: its scheme only, none of parse()'s checks (nor
    the SQLite file's system calls), for callers holding a URL that start-up has
    already parsed."""
    kind = scheme_kind(url)
    if kind is None:
        return parse(url).kind  # raises DatabaseConfigError, with parse()'s words
    return kind


_ENCODED = "%2F, %3F, %23; '@' as %40, '%' as %25"


def parse(url: str, *, create: bool = False) -> Target:
    """Check a database URL and split it into kind and driver parameters."""
    scheme = url.split(":", 1)[0].lower()
    kind = SCHEMES.get(scheme)
    if kind is None:
        raise DatabaseConfigError(
            f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH, "
            "postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB"
        )
    # The host part ends at the first "/", "?" or "#": one in a password cuts it there,
    # so the rest of the URL holds the "@". Never echoed: it holds part of the password.
    rest = url.split("://", 1)[-1]
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    if kind != "sqlite" and "@" in rest[min(ends, default=len(rest)) :]:
        raise DatabaseConfigError(
            f"the database URL cannot be read: its user or password holds '/', '?' or '#'; "
            f"they must be percent-encoded there ({_ENCODED})"
        )
    try:
        params = parse_db_url(url, unquote_password=True, unquote_user=True)
    except ValueError:  # a port that is not a number; the driver's words would echo it
        raise DatabaseConfigError(
            "the database URL cannot be read: its port is not a number (a password holding "
            f"'/', '?' or '#' must be percent-encoded: {_ENCODED})"
        ) from None
    if "prepare" in params:
        # Ours, not the driver's: whether the serving pool prepares its hot statements.
        value = params["prepare"]
        if kind != "postgresql" or value not in (True, False):
            raise DatabaseConfigError(
                "the URL's prepare option is for postgresql:// URLs: prepare=true or prepare=false"
            )
    if kind == "sqlite":
        if params.get("host"):
            # sqlite://relative.db: two slashes, so playhouse reads "relative.db" as a host.
            path = url.split("://", 1)[1].partition("?")[0]
            named = path.rpartition("/")[2].rpartition("@")[2]  # never a user or password
            raise DatabaseConfigError(
                f"a SQLite URL has three slashes and no host: sqlite:///{named} for a file "
                f"relative to the working folder, sqlite:////abs/path/{named} for an "
                "absolute one"
            )
        if set(params) - {"database"}:
            raise DatabaseConfigError(
                "the SQLite URL takes no options: the server sets SQLite's own (WAL, "
                "synchronous=FULL, a busy timeout of --database-timeout)"
            )
        _check_sqlite_path(params.get("database") or "", create=create)
    elif not params.get("database"):
        raise DatabaseConfigError(f"the {kind} URL must name a database, as in {scheme}://HOST/DB")
    if "passwd" in params:
        params["password"] = params.pop("passwd")
    if kind == "postgresql":
        _check_postgresql_options(params)
    elif kind == "mysql":
        _check_mysql_options(params)
    return Target(kind, params)


def _check_postgresql_options(params: dict[str, Any]) -> None:
    """Option names libpq knows (its values it checks when it connects, and says what
    is wrong); the client encoding is the server's to choose."""
    options = {k: str(v) for k, v in params.items() if k != "prepare" and v is not None}
    try:
        psycopg2.extensions.make_dsn(**options)
    except psycopg2.ProgrammingError as exc:
        # libpq names the option ('invalid connection option "bogus"'), not its value.
        found = re.search(r'option "([^"]+)"', str(exc))
        named = f"option {found[1]!r}" if found else "options"
        raise DatabaseConfigError(
            f"the postgresql URL has an unknown {named}; options go to libpq, as in "
            "?sslmode=require"
        ) from None
    encoding = params.get("client_encoding")
    if encoding is not None and str(encoding).replace("-", "").upper() != "UTF8":
        raise DatabaseConfigError(
            "the postgresql URL's client_encoding must be UTF8 (or be left out): names "
            "and emails may hold any Unicode character"
        )


# PyMySQL options that the server's code depends on: not for the URL to change.
_MYSQL_OWN = ("autocommit", "client_flag", "conv", "cursorclass", "db", "defer_connect")
_MYSQL_FILES = ("ssl_ca", "ssl_cert", "ssl_key", "read_default_file")


def _check_mysql_options(params: dict[str, Any]) -> None:
    """The URL's options for PyMySQL: known names, utf8mb4, files that exist, and values
    the driver accepts (checked by making a connection object that does not connect)."""
    known = set(inspect.signature(pymysql.connections.Connection.__init__).parameters)
    for name in params:
        if name in _MYSQL_OWN:
            raise DatabaseConfigError(
                f"the mysql URL's option {name!r} is the server's to set; leave it out"
            )
        if name not in known:
            raise DatabaseConfigError(
                f"the mysql URL has an unknown option {name!r}; options go to PyMySQL, "
                "as in ?ssl_ca=/path/to/ca.pem"
            )
    charset = params.get("charset")
    if charset is not None and str(charset).lower() != "utf8mb4":
        raise DatabaseConfigError(
            "the mysql URL's charset must be utf8mb4 (or be left out): utf8 and the "
            "others cannot hold every character a name or an email may have"
        )
    for name in _MYSQL_FILES:
        if name in params and not Path(str(params[name])).is_file():
            raise DatabaseConfigError(f"the mysql URL's {name} names no file: {params[name]!r}")
    try:
        pymysql.connections.Connection(**params, defer_connect=True)
    except Exception as exc:  # noqa: BLE001 - any refusal of the values is the URL's fault
        raise DatabaseConfigError(
            f"the mysql URL's {_refused_mysql_option(params) or 'options'} cannot be used: "
            f"{first_line(exc)}"
        ) from None


def _refused_mysql_option(params: dict[str, Any]) -> str:
    """Which of the URL's options PyMySQL refuses alone ("option 'connect_timeout'"), its
    value not repeated; "" when none does alone."""
    base = {k: params[k] for k in ("host", "user", "database") if k in params}
    for name in params:
        if name in base or name in ("password", "port"):
            continue
        try:
            pymysql.connections.Connection(**base, **{name: params[name]}, defer_connect=True)
        except Exception:  # noqa: BLE001 - this one is refused
            return f"option {name!r}"
    return ""


def _check_sqlite_path(path: str, *, create: bool) -> None:
    if not path or path == ":memory:" or path.startswith("file:"):
        raise DatabaseConfigError("the SQLite URL must name a file, as in sqlite:///enrollment.db")
    file = Path(path)
    if file.is_dir():
        raise DatabaseConfigError(f"the SQLite URL names a folder, not a file: {path!r}")
    folder = file.parent
    if not folder.is_dir():
        raise DatabaseConfigError(f"the directory of the SQLite file {path!r} does not exist")
    if not create and not file.exists():
        raise DatabaseConfigError(
            f"the SQLite file {path!r} does not exist; `enrollment-server migrate` creates it"
        )
    # In WAL mode SQLite writes the file and creates its -wal and -shm files beside it,
    # even to read: a folder it cannot write fails every call with "unable to open
    # database file". Said here, at start-up, in words an operator can act on.
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise DatabaseConfigError(
            f"the SQLite file {path!r} is on a read-only file system; SQLite writes "
            "the file and its -wal and -shm files in that directory"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DatabaseConfigError(
            f"the directory of the SQLite file {path!r} is not writable by this user; "
            "SQLite creates its -wal and -shm files there"
        )
    if file.exists() and not os.access(file, os.R_OK | os.W_OK):
        raise DatabaseConfigError(
            f"the SQLite file {path!r} is not readable and writable by this user"
        )
    # Left by a crash of a process run as another user: readable, SQLite opens the
    # database read-only and every write fails; not even readable, nothing opens.
    for side in (f"{path}-wal", f"{path}-shm"):
        if os.path.exists(side) and not os.access(side, os.R_OK | os.W_OK):
            raise DatabaseConfigError(
                f"SQLite's {side!r} is not writable by this user (left by another user's "
                "server that stopped uncleanly?): give it to this user"
            )


def _driver_params(
    target: Target, timeout: float, statement_timeout: float | None
) -> dict[str, Any]:
    """Connection parameters that make every wait end: connecting, locks, statements.

    statement_timeout None (schema commands) lets a long migration run to its end.
    """
    params = dict(target.params)
    whole_seconds = max(1, math.ceil(timeout))
    # In whole milliseconds, never 0: to PostgreSQL a timeout of 0 is no limit at all.
    millis = max(1, math.ceil(timeout * 1000))
    if target.kind == "sqlite":
        params.pop("database")
        params.setdefault("pragmas", {**SQLITE_PRAGMAS, "busy_timeout": millis})
        params.setdefault("check_same_thread", False)
    elif target.kind == "postgresql":
        params.pop("prepare", None)  # the pool's own (open_pool)
        # The URL's own options first: where both set something, the last -c wins.
        options = [str(params.pop("options", "") or "")]
        options.append(f"-c lock_timeout={millis}")
        if statement_timeout is not None:
            options.append(f"-c statement_timeout={max(1, math.ceil(statement_timeout * 1000))}")
        params.pop("database")
        params.setdefault("connect_timeout", whole_seconds)
        params.setdefault("application_name", "enrollment")
        params["options"] = " ".join(filter(None, options))
        # A peer that vanishes without a word (a cut cable, a dead host) is noticed
        # within a few seconds rather than after the kernel's 15-minute default.
        # Linux takes an idle time of at most 32767 s, and libpq a C int of milliseconds.
        params.setdefault("keepalives_idle", min(whole_seconds, 32767))
        params.setdefault("keepalives_interval", 1)
        params.setdefault("keepalives_count", 3)
        params.setdefault("tcp_user_timeout", min(whole_seconds * 2000, 2**31 - 1))
    else:
        # Row locks and metadata locks (a schema change behind a running transaction)
        # wait as long as a call may; MariaDB's default for the latter is a day.
        session = (
            f"SET SESSION innodb_lock_wait_timeout = {whole_seconds}, "
            f"SESSION lock_wait_timeout = {whole_seconds}"
        )
        if statement_timeout is not None:
            session += f", SESSION max_statement_time = {statement_timeout:.3f}"
        params.pop("database")
        params.setdefault("charset", "utf8mb4")
        params.setdefault("connect_timeout", whole_seconds)
        # READ COMMITTED, as on PostgreSQL: every statement sees what is committed, and
        # the locking statements decide races the same way on both databases. A URL's
        # init_command runs first (PyMySQL runs it on connecting), these after it.
        params["session_sql"] = (
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            session,
        )
        # A server that stops answering mid-query is given up on.
        limit = whole_seconds * 2 + (statement_timeout or 0)
        params.setdefault("read_timeout", limit if statement_timeout is not None else None)
        params.setdefault("write_timeout", whole_seconds * 2)
    return params


class _MySQLSession:
    """Runs session settings on every new connection, after the URL's init_command if it
    has one (PyMySQL's init_command takes one statement, and the isolation level needs
    its own)."""

    def __init__(self, *args: Any, session_sql: tuple[str, ...] = (), **kwargs: Any) -> None:
        self._session_sql = session_sql
        super().__init__(*args, **kwargs)

    def _initialize_connection(self, conn: Any) -> None:
        # peewee calls this at every checkout from the pool; the settings need one
        # round trip per new connection only.
        # A mixin: the database class after it in the MRO has the method.
        super()._initialize_connection(conn)  # type: ignore[misc]
        if self._session_sql and not getattr(conn, "enrollment_session", False):
            with conn.cursor() as cursor:
                for statement in self._session_sql:
                    cursor.execute(statement)
            conn.enrollment_session = True


# init: playhouse's (read from its source) and peewee's stubs spell it differently.
class PooledMariaDBDatabase(_MySQLSession, PooledMySQLDatabase):  # type: ignore[misc]
    """The serving pool for mysql:// URLs (MariaDB or MySQL) with the session settings."""


class MariaDBDatabase(_MySQLSession, pw.MySQLDatabase):
    """One unpooled connection with the same settings (health probes, tests)."""


class _TransactionEnds(threading.local):
    """Per thread (peewee's connection state is): what goes before the next statement
    (a BEGIN, savepoints opened, released or rolled back to, statements deferred; each
    ending "; ") and the deferred statements' parameters, how many times such text went
    out, and a transaction that a statement ended already."""

    pending = ""
    params: tuple[Any, ...] = ()
    sent = 0
    ended = False


_BEGIN = "BEGIN; "


class PooledPostgresDatabase(PooledPostgresqlDatabase):
    """The serving pool for postgresql:// URLs. Each round trip to the database costs
    about as much CPU here as a small statement's own work, so a transaction's control
    statements go with its other statements where they can:

    - BEGIN goes in the same round trip as the transaction's first statement
      ("BEGIN; <statement>", one simple query; a failure of the statement leaves the
      transaction open and failed, as after a separate BEGIN, and the rollback ends it).
      A transaction that ran no statement sends neither BEGIN nor COMMIT.
    - So do a savepoint's SAVEPOINT, RELEASE and ROLLBACK TO (savepoint()): each goes
      before the next statement, or before the COMMIT. A savepoint whose block sent no
      statement sends none of them; one whose transaction rolls back sends no RELEASE.
      A failure in "SAVEPOINT s; <statement>" comes from the statement (SAVEPOINT
      itself cannot fail in a transaction that is not failed already), so the
      savepoint exists and ROLLBACK TO it leaves the transaction usable, as before.
    - So do the statements whose result nobody reads (execute_later(): a count kept
      up to date, a response recorded). A deferred statement's failure is the failure
      of the statement it went with: the transaction fails either way, and the call
      with it. Statements deferred in a savepoint that is rolled back before they went
      out are never sent.
    - A write's last statement may carry its COMMIT (execute_and_commit(): the
      outbox's numbered INSERT does, persistence/outbox.py says why); commit() then
      knows that the transaction has ended already, so it sends no second COMMIT.

    Every statement of a transaction comes through execute_sql or a cursor() (peewee's
    own queries, peewee-migrate, ours): a cursor taken while control text is pending
    sends it first, so nothing runs outside the transaction or savepoint it belongs to.

    The hot INSERTs are prepared on each connection (prepare_statements(); which ones
    and why only INSERTs: prepared.to_prepare): the database then parses and plans
    them once per connection instead of once per call, which was most of its CPU for
    the change feed's numbered INSERT (bench/PROFILE.md, tenth session). A statement
    registered there is PREPAREd when a connection is checked out of the
    pool and has not prepared it yet (outside any transaction: the pool's connections
    are in autocommit between transactions), and from then on goes out on that
    connection as "EXECUTE name(values)", with the same values bound by the driver as
    before. A statement the database refuses to prepare is logged once and sent as it
    is. PREPARE lasts as long as the connection, whatever its transactions do; a
    connection made again prepares again. `prepare=false` in the URL turns it off, for
    a pooler that hands one session's connection to another between transactions
    (PgBouncer's transaction pooling)."""

    def __init__(self, *args: Any, prepare: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._ends = _TransactionEnds()
        # A BEGIN that names an isolation level is sent as it is (this pool is opened
        # without one: PostgreSQL's READ COMMITTED).
        self._isolated = kwargs.get("isolation_level") is not None
        self._prepares = prepare
        self._statements: list[_Statement] = []  # registered, in order
        # The same by the SQL they run, less those the database would not prepare.
        self._by_sql: dict[str, _Statement] = {}
        # Per connection: how many registered statements it has been through (weak: a
        # closed connection goes with its entry).
        self._prepared_on: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def prepare_statements(self, sqls: Iterable[str]) -> None:
        """Register statements (SQL as execute_sql takes it, %s for each value) to be
        prepared on each connection; call before serving (a connection checked out
        before prepares them at its next checkout)."""
        if not self._prepares:
            return
        for sql in sqls:
            if sql not in self._by_sql:
                statement = _Statement.of(len(self._statements), sql)
                self._statements.append(statement)
                self._by_sql[sql] = statement

    def _initialize_connection(self, conn: Any) -> None:
        # peewee calls this at every checkout from the pool, between transactions.
        super()._initialize_connection(conn)  # type: ignore[misc]
        done = self._prepared_on.get(conn, 0)
        if done < len(self._statements):
            upto = len(self._statements)
            self._prepare(conn, self._statements[done:upto])
            self._prepared_on[conn] = upto

    def _prepare(self, conn: Any, statements: list[_Statement]) -> None:
        with conn.cursor() as cursor:
            for statement in statements:
                if self._by_sql.get(statement.sql) is not statement:
                    continue  # refused on another connection: sent as it is
                try:
                    cursor.execute(statement.prepare)
                except psycopg2.Error as exc:
                    if conn.closed:
                        raise
                    self._by_sql.pop(statement.sql, None)
                    log.warning(
                        "a statement cannot be prepared, it is sent as it is: %s (%s)",
                        first_line(exc),
                        statement.sql[:120],
                    )

    def _prepared(self, sql: str) -> str:
        """What goes out for sql on this thread's connection: its EXECUTE where the
        connection has prepared it, else sql itself."""
        statement = self._by_sql.get(sql)
        conn = self._state.conn  # type: ignore[attr-defined]
        if statement is None or conn is None or statement.number >= self._prepared_on.get(conn, 0):
            return sql
        return statement.execute

    def execute_and_commit(self, sql: str, params: Any) -> None:
        """Run sql, the transaction's last statement, and COMMIT in the same round trip."""
        self._execute(self._prepared(sql) + "; COMMIT", params)
        self._ends.ended = True

    def begin(self, isolation_level: Any = None) -> None:
        ends = self._ends
        ends.ended = False
        ends.params = ()
        if isolation_level is None and not self._isolated:
            ends.pending = _BEGIN
            return
        ends.pending = ""
        super().begin(isolation_level)

    def execute_later(self, sql: str, params: Any) -> None:
        """Run sql (its result unread) with the next statement sent in this transaction;
        outside a transaction, now."""
        if not self.in_transaction():
            self.execute_sql(sql, params)
            return
        ends = self._ends
        ends.pending += self._prepared(sql) + "; "
        ends.params += tuple(params)

    def savepoint(self) -> Any:  # what atomic() gives inside a transaction: a _Savepoint
        return _Savepoint(self._ends)

    def _due(self) -> tuple[str, tuple[Any, ...]]:
        """The text (and its parameters) that goes before the statement about to be
        sent; then it is no longer pending. Text pending outside any transaction (a
        BEGIN whose transaction ended without a statement) is dropped."""
        ends = self._ends
        due, params = ends.pending, ends.params
        if not due:
            return "", ()
        ends.pending, ends.params = "", ()
        ends.sent += 1
        return (due, params) if self.in_transaction() else ("", ())

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        return self._execute(self._prepared(sql) if self._by_sql else sql, params)

    def _execute(self, sql: str, params: Any) -> Any:
        """sql as it goes out, after what is pending."""
        due, before = self._due()
        if before and not params and "%" in sql:
            # sql is not written for parameters (a literal %): the deferred go alone.
            self._send(due, before)
            due, before = "", ()
        if due:
            sql = due + sql
            if before:
                params = (*before, *params) if params else before
        try:
            return super().execute_sql(sql, params)  # type: ignore[no-untyped-call]
        except pw.OperationalError as exc:
            self._note_lost(exc)
            raise

    def cursor(self, named_cursor: Any = None) -> Any:
        cursor = super().cursor(named_cursor)  # type: ignore[no-untyped-call]
        due, before = self._due()
        if due:  # a statement not through execute_sql: what is pending goes first
            cursor.execute(due, before or None)
        return cursor

    def commit(self) -> None:
        ends = self._ends
        pending, params = ends.pending, ends.params
        ends.pending, ends.params = "", ()
        if pending == _BEGIN:  # no statement ran: nothing began, nothing to end
            return
        if ends.ended:
            ends.ended = False
            return
        if pending:  # a RELEASE or a deferred statement not sent yet goes with the COMMIT
            self._send(pending + "COMMIT", params)
            return
        super().commit()

    def _send(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            with pw.__exception_wrapper__:  # type: ignore[attr-defined]
                self.cursor().execute(sql, params or None)
        except pw.OperationalError as exc:
            self._note_lost(exc)
            raise

    def _note_lost(self, exc: pw.OperationalError) -> None:
        """A statement failed: where the database no longer knows a statement prepared
        on this connection, something between us shares its sessions (a pooler in
        transaction mode), so this process prepares nothing from now on. The failed
        transaction is run again (failures.classify), now with the plain statements."""
        cause = getattr(exc, "orig", None) or exc
        if getattr(cause, "pgcode", None) != LOST_STATEMENT or not self._by_sql:
            return
        self._prepares, self._statements, self._by_sql = False, [], {}
        log.warning(
            "the database has lost a statement this process prepared (a pooler in "
            "transaction mode between them?): statements go unprepared from now on; "
            "add prepare=false to the database URL to say so at start-up"
        )

    def rollback(self) -> None:
        ends = self._ends
        pending = ends.pending
        ends.pending, ends.params = "", ()
        if pending.startswith(_BEGIN):  # nothing went out, deferred statements included
            return
        super().rollback()


_VALUE = re.compile("%%|%s")
# PostgreSQL's invalid_sql_statement_name: EXECUTE of a name the session does not know.
LOST_STATEMENT = "26000"


class _Statement(NamedTuple):
    """A statement prepared on each connection of the PostgreSQL pool."""

    number: int
    sql: str  # as execute_sql takes it
    prepare: str  # PREPARE name AS … ($1, $2, … for its values)
    execute: str  # EXECUTE name(%s, …): what goes out instead of sql

    @classmethod
    def of(cls, number: int, sql: str) -> _Statement:
        name = f"enrollment_{number}"
        count = 0

        def placeholder(found: re.Match[str]) -> str:
            nonlocal count
            if found.group() == "%%":
                return "%"
            count += 1
            return f"${count}"

        body = _VALUE.sub(placeholder, sql)
        values = f"({', '.join(['%s'] * count)})" if count else ""
        return cls(number, sql, f"PREPARE {name} AS {body}", f"EXECUTE {name}{values}")


class _Savepoint:
    """peewee's savepoint for PooledPostgresDatabase: its SAVEPOINT, RELEASE and
    ROLLBACK TO are left pending, to go with the next statement sent (see there)."""

    __slots__ = ("_ends", "_name", "_mark", "_params", "_opened", "_sent")
    _numbers = itertools.count(1)

    def __init__(self, ends: _TransactionEnds) -> None:
        self._ends = ends
        self._name = f'"s{next(self._numbers)}"'

    def __enter__(self) -> _Savepoint:
        ends = self._ends
        self._mark = len(ends.pending)
        self._params = len(ends.params)
        self._sent = ends.sent
        ends.pending += f"SAVEPOINT {self._name}; "
        self._opened = len(ends.pending)
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        ends = self._ends
        if ends.sent == self._sent and (kind is not None or len(ends.pending) == self._opened):
            # Nothing went out since it opened, and it is undone or holds nothing: as
            # though it never was (with anything deferred in it).
            ends.pending = ends.pending[: self._mark]
            ends.params = ends.params[: self._params]
        elif kind is None:
            ends.pending += f"RELEASE SAVEPOINT {self._name}; "
        else:
            ends.pending += f"ROLLBACK TO SAVEPOINT {self._name}; "


@dataclass(frozen=True)
class Timeouts:
    """The waits the serving pool was opened with, in seconds."""

    database: float  # for a lock or a new connection (--database-timeout)
    pool: float  # for a free pooled connection (--pool-timeout)
    statement: float | None  # for one statement to run (None: no limit)


_timeouts = Timeouts(database=5.0, pool=5.0, statement=None)


def timeouts() -> Timeouts:
    """The waits of the pool open_pool opened last (the defaults before any)."""
    return _timeouts


_POOLED: dict[str, type[pw.Database]] = {
    "sqlite": PooledSqliteDatabase,
    "postgresql": PooledPostgresDatabase,
    "mysql": PooledMariaDBDatabase,
}
_PLAIN: dict[str, type[pw.Database]] = {
    "sqlite": pw.SqliteDatabase,
    "postgresql": pw.PostgresqlDatabase,
    "mysql": MariaDBDatabase,
}


def open_pool(
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
    global _timeouts
    target = parse(url, create=create)
    waits = Timeouts(
        database=timeout,
        pool=timeout if pool_timeout is None else pool_timeout,
        statement=statement_timeout,
    )
    own: dict[str, Any] = {}
    if target.kind == "postgresql":
        own["prepare"] = target.params.get("prepare", True)
    db = _POOLED[target.kind](
        target.name,
        max_connections=max_connections,
        stale_timeout=None,
        timeout=waits.pool,
        **own,
        **_driver_params(target, timeout, statement_timeout),
    )
    proxy.initialize(db)
    kept_idle.clear()  # no thread keeps a connection of this pool yet
    _timeouts = waits
    return db


def open_probe(url: str, *, timeout: float, **overrides: Any) -> pw.Database:
    """An unpooled database for health probes: its failures never touch the RPC pool.
    overrides: driver parameters of its own (a PostgreSQL application_name)."""
    target = parse(url)
    params = {**_driver_params(target, timeout, timeout), **overrides}
    return _PLAIN[target.kind](target.name, **params)


def discard_idle() -> None:
    """Close the pool's idle connections (after an outage they are all dead)."""
    close_idle = getattr(proxy.obj, "close_idle", None)
    if close_idle is not None:
        with contextlib.suppress(Exception):
            close_idle()


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


def kind() -> str:
    """The kind of the database the models are bound to: "sqlite", "postgresql" or
    "mysql" (MariaDB too); "" before any."""
    db = proxy.obj
    for name, base in (
        ("sqlite", pw.SqliteDatabase),
        ("postgresql", pw.PostgresqlDatabase),
        ("mysql", pw.MySQLDatabase),
    ):
        if isinstance(db, base):
            return name
    return ""


# The threads whose kept connection (unit_of_work.connection_kept) is checked out of
# the pool but in no unit of work right now.
kept_idle: set[int] = set()


def connections_in_use() -> int:
    """Pooled connections in a unit of work right now (0 for a database without a
    pool): those checked out, less those a thread keeps between its calls."""
    checked_out = len(getattr(proxy.obj, "_in_use", ()) or ())
    return max(0, checked_out - len(kept_idle))


def close_pool() -> None:
    """Close every pooled connection (at shutdown)."""
    db = proxy.obj
    if db is None:
        return
    if hasattr(db, "close_all"):
        db.close_all()
    else:
        db.close()
