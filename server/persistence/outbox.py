"""The change feed's outbox: a write's events are held in memory while it runs and
written, numbered, as the last statements of its transaction.

Ordering. The contract says that once any reader has seen sequence N, no event with a
sequence of N or less may appear later. An identity column or a database sequence does
not give that on PostgreSQL or MariaDB: values are taken when a row is inserted but
become visible when its transaction commits, so a transaction that took 41 can commit
after one that took 42, and a reader that saw 42 and resumes "after 42" loses 41.

Here the numbers come from one counter row (event_counters 'sequence') that every
writing transaction with events updates as its last statements, then inserts its events
numbered from the value it read, then commits. The UPDATE locks the row until the
commit, so a second writer's UPDATE waits until the first has committed and then reads
the committed value (READ COMMITTED on PostgreSQL and MariaDB, see engine.py; a
locking read on InnoDB in any case). So whoever holds numbers above N committed after
whoever holds N, and both databases make a commit visible before its locks are released
(PostgreSQL leaves the ProcArray before releasing locks; InnoDB marks the transaction
committed before releasing its record locks): any snapshot that shows N+1 also shows
N. SQLite has one writer at a time, so the same holds trivially. A rolled back
transaction takes its counter update with it, so sequences have no gaps but those the
retention purge makes.

The price: writers that have events take turns for the counter from their last
statement to their commit (not while they check and lock their rows); on PostgreSQL
the COMMIT goes in the same round trip as that statement (_Statements says why).
bench/PROFILE.md has the figures.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, NamedTuple

import peewee as pw

from enrollment.server.persistence import engine, notify
from enrollment.server.persistence.models import SEQUENCE, EventCounter, proxy
from enrollment.server.persistence.prepared import Prepared, raw


class Row(NamedTuple):
    """One event's columns but its sequence, in the order of the table's (_COLUMNS)."""

    event_time: dt.datetime
    type: int
    student_id: int
    course_id: int
    payload: str
    request_id: str
    actor: str


class _Pending:
    __slots__ = ("commit_sent", "data", "finishers", "rows")

    def __init__(self) -> None:
        self.commit_sent = False
        self.rows: list[Row] = []
        self.finishers: list[Callable[[], None]] = []
        self.data: dict[str, Any] = {}  # the domain's own per-transaction state


_pending: ContextVar[_Pending | None] = ContextVar("outbox_pending", default=None)


def begin() -> Token[_Pending | None]:
    """A write transaction starts: nothing pending."""
    return _pending.set(_Pending())


def end(token: Token[_Pending | None]) -> None:
    """The transaction ended (committed or rolled back): whatever was pending is gone."""
    _pending.reset(token)


def _current() -> _Pending:
    pending = _pending.get()
    if pending is None:
        raise RuntimeError("events can only be recorded inside a write transaction")
    return pending


_listeners: list[Callable[[], None]] = []


def on_commit(listener: Callable[[], None]) -> None:
    """Call listener (from the committing thread; it must be cheap and thread-safe)
    after every commit that wrote events in this process."""
    _listeners.append(listener)


def remove_listener(listener: Callable[[], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def committed() -> None:
    for listener in tuple(_listeners):
        listener()


def state() -> dict[str, Any]:
    """A dict that lives as long as the current write transaction (for the domain)."""
    return _current().data


def before_flush(finish: Callable[[], None]) -> None:
    """Run finish once, just before this transaction's events are numbered (the domain
    fills in its snapshots there, showing the state after the whole call)."""
    _current().finishers.append(finish)


def add(row: Row) -> None:
    """One event; numbered in the order added."""
    _current().rows.append(row)


def take() -> list[Row]:
    """Run the finishers (the domain's snapshots), then hand over the pending events and
    forget them: what flush() numbers and inserts."""
    pending = _pending.get()
    if pending is None:
        return []
    while pending.finishers:
        pending.finishers.pop(0)()
    rows, pending.rows = pending.rows, []
    return rows


def flush() -> int:
    """Number and insert the pending events; the last statements before the commit.
    On PostgreSQL the statement that does it carries the COMMIT too (see _Statements;
    commit_sent() tells). Returns how many events were written."""
    return write(take())


def write(rows: list[Row]) -> int:
    """Number and insert these events (take()'s, of one transaction or of the several
    writes that commit together on SQLite: unit_of_work's group commit). Returns how
    many."""
    if not rows:
        return 0
    statements = _statements()
    if statements.numbering and len(rows) <= INSERT_ROWS:
        statements.insert_numbered(rows)
        return len(rows)
    first = advance(SEQUENCE, len(rows)) - len(rows) + 1
    for start in range(0, len(rows), INSERT_ROWS):
        chunk = rows[start : start + INSERT_ROWS]
        proxy.execute_sql(statements.insert(len(chunk)), _numbered(chunk, first + start))
    return len(rows)


def commit_sent() -> bool:
    """Whether this transaction's COMMIT went out with its events (flush): then a
    failure of that statement may or may not have committed it."""
    pending = _pending.get()
    return pending is not None and pending.commit_sent


def _numbered(rows: list[Row], first: int) -> list[Any]:
    """The rows' values for a VALUES list, each row's number (first, first + 1, …) first."""
    values: list[Any] = []
    for number, row in enumerate(rows, start=first):
        values += (number, *row)
    return values


# Events per INSERT: a forced delete of a large course writes thousands, and SQLite
# takes at most 32766 bound values per statement (MariaDB 65535).
INSERT_ROWS = 500


_COLUMNS = ("sequence", *Row._fields)
# A numbered VALUES row's types on PostgreSQL: the event's place in the call, then Row's.
_PG_TYPES = ("integer", "timestamp", "smallint", "bigint", "bigint", "text", "varchar", "varchar")
# Prepared on each connection: the numbered INSERTs of 1 to this many events (an
# enrollment or a drop writes 1, a promotion 2; a forced delete's many are not worth it).
PREPARED_ROWS = 4


class _Statements:
    """The outbox's SQL, written once per database: peewee would compile it on every
    call (the Prepared helper cannot mark text values), which cost more than running it.

    The counter is raised and read back in ONE statement where the database can:
    UPDATE … RETURNING on SQLite (3.35+) and PostgreSQL; on MariaDB, whose UPDATE has no
    RETURNING, the new value goes through LAST_INSERT_ID(expr), which the UPDATE's own
    answer carries back (the cursor's lastrowid). On PostgreSQL the same statement sends
    the NOTIFY that wakes other processes' watchers (persistence/notify.py): PostgreSQL
    delivers it at commit, and only if the transaction commits.

    On PostgreSQL the counter's raise and the events' INSERT go as ONE statement
    (`numbering`: a data-modifying WITH numbers the rows from the value it raised),
    and the COMMIT goes in the same round trip, after it. The counter's row is locked
    from that statement to the commit, so every writer with events waits for the one
    before it to commit: with the COMMIT sent apart, that wait took in the way back to
    Python and the committing thread's wait for the GIL (5 ms at worst with the other
    threads busy) before COMMIT went out, for every writer queued behind it. Sent
    together, the lock is held for the database's own work only (the write mix's
    outbox cost: bench/PROFILE.md). The raise is an upsert there, so the one statement
    also makes the counter's row when it is not made yet (the first events ever); the
    two-statement way (advance) does that elsewhere. A failure of the statement is
    a failed commit (unit_of_work asks commit_sent()).
    MariaDB's driver sends one statement at a time (pymysql without
    CLIENT.MULTI_STATEMENTS), so there the COMMIT still goes on its own.
    """

    def __init__(self, db: pw.Database) -> None:
        self.db = db
        open_, close = db.quote[0], db.quote[1]  # the opening and closing quote
        self.mark = db.param

        def q(name: str) -> str:
            return f"{open_}{name}{close}"

        table, value, name = q("event_counters"), q("value"), q("name")
        where = f"WHERE {name} = {self.mark}"
        self.notifies = isinstance(db, pw.PostgresqlDatabase)
        if isinstance(db, pw.MySQLDatabase):
            self.kind = "last_insert_id"
            self.advance = (
                f"UPDATE {table} SET {value} = LAST_INSERT_ID({value} + {self.mark}) {where}"
            )
        elif isinstance(db, pw.SqliteDatabase) and sqlite3.sqlite_version_info < (3, 35):
            self.kind = "select"  # no RETURNING yet: read it back
            self.advance = f"UPDATE {table} SET {value} = {value} + {self.mark} {where}"
            self.read = f"SELECT {value} FROM {table} {where}"
        else:
            self.kind = "returning"
            sends = f", pg_notify('{notify.CHANNEL}', '{notify.token()}')"
            self.advance = (
                f"UPDATE {table} SET {value} = {value} + {self.mark} {where} "
                f"RETURNING {value}{sends if self.notifies else ''}"
            )
        names = ", ".join(q(c) for c in _COLUMNS)
        self._row = "(" + ", ".join([self.mark] * len(_COLUMNS)) + ")"
        self._insert = f"INSERT INTO {q('events')} ({names}) VALUES "
        self._sql: dict[tuple[str, int], str] = {}  # by (kind, row count)
        self.numbering = self.notifies  # PostgreSQL: see above
        # The serving pool, whose commit() is told that the COMMIT went out (engine.py).
        self.committing = db if isinstance(db, engine.PooledPostgresDatabase) else None
        if self.numbering:
            # v.k is the event's place in the call (1, 2, …), the VALUES' first column.
            # Each value names its type: a prepared statement (engine.py) cannot tell
            # a VALUES list's types from the columns its rows go to.
            self._typed_row = "(" + ", ".join(f"{self.mark}::{t}" for t in _PG_TYPES) + ")"
            taken = ", ".join(f"v.{c}" for c in _COLUMNS[1:])
            self._numbered = (
                f"WITH c AS (INSERT INTO {table} ({name}, {value}) "
                f"VALUES ({self.mark}, {self.mark}) ON CONFLICT ({name}) "
                f"DO UPDATE SET {value} = {table}.{value} + EXCLUDED.{value} "
                f"RETURNING {value}{sends}) "
                f"INSERT INTO {q('events')} ({names}) "
                f"SELECT c.{value} - {self.mark}::bigint + v.k, {taken} FROM c, (VALUES "
            )
            self._numbered_as = f") AS v(k, {', '.join(_COLUMNS[1:])})"

    def _rows(self, kind: str, count: int, head: str, tail: str = "", row: str = "") -> str:
        """head, count VALUES rows (row, or the plain one), tail: kept for the common
        sizes (a forced delete's hundreds are not)."""
        found = self._sql.get((kind, count))
        if found is None:
            found = head + ", ".join([row or self._row] * count) + tail
            if count <= 16:
                self._sql[(kind, count)] = found
        return found

    def insert(self, count: int) -> str:
        """The INSERT of count events, in one statement."""
        return self._rows("insert", count, self._insert)

    def insert_numbered(self, rows: list[Row]) -> None:
        """Raise the counter and insert the rows numbered from it, in one statement;
        on the serving pool of PostgreSQL, the transaction's COMMIT with it."""
        count = len(rows)
        sql = self._numbered_sql(count)
        values: list[Any] = [SEQUENCE, count, count, *_numbered(rows, 1)]
        if self.committing is None:
            proxy.execute_sql(sql, values)
            return
        _current().commit_sent = True
        self.committing.execute_and_commit(sql, values)

    def _numbered_sql(self, count: int) -> str:
        return self._rows("numbered", count, self._numbered, self._numbered_as, self._typed_row)

    def to_prepare(self) -> list[str]:
        """The statements worth preparing on each connection (engine.py): PostgreSQL's
        numbered INSERT for the event counts a call writes most (1 to PREPARED_ROWS)."""
        if not self.numbering:
            return []
        return [self._numbered_sql(count) for count in range(1, PREPARED_ROWS + 1)]

    def raise_counter(self, name: str, by: int) -> int | None:
        """The counter's new value, or None when its row is not made yet."""
        cursor = proxy.execute_sql(self.advance, (by, name))
        if self.kind == "returning":
            found = cursor.fetchall()  # all: SQLite's statement then ends
            return int(found[0][0]) if found else None
        if cursor.rowcount != 1:
            return None
        if self.kind == "last_insert_id":
            return int(cursor.lastrowid)
        return int(proxy.execute_sql(self.read, (name,)).fetchone()[0])


_cached: _Statements | None = None


def _statements() -> _Statements:
    global _cached
    db = proxy.obj
    if _cached is None or _cached.db is not db:
        _cached = _Statements(db)
    return _cached


def to_prepare() -> list[str]:
    """The outbox's statements worth preparing on the serving pool's connections."""
    return _statements().to_prepare()


def advance(name: str, by: int) -> int:
    """Raise a counter by `by` and return its new value, holding its row locked until
    the transaction ends. The row is made by the first use (migration 005 inserts none,
    so that rolling back an unused feed drops no rows): when two first writers race,
    the second one's insert waits for the first's commit, fails, and updates instead."""
    statements = _statements()
    value = statements.raise_counter(name, by)
    if value is not None:
        return value
    try:
        with proxy.atomic():  # a savepoint: the duplicate leaves the transaction usable
            EventCounter.insert(name=name, value=by).execute()
    except pw.IntegrityError:
        value = statements.raise_counter(name, by)
        if value is None:
            raise
        return value
    if statements.notifies:
        proxy.execute_sql(f"NOTIFY {notify.CHANNEL}, '{notify.token()}'")
    return by


# Raise a counter of creates by one, making it at its first use: either way its row
# stays locked until the transaction ends (PostgreSQL and MariaDB only; take_turn).
def _take_turn(name: Any) -> pw.Insert:
    # MariaDB's ON DUPLICATE KEY UPDATE names no conflict target; PostgreSQL's needs one.
    target = None if isinstance(proxy.obj, pw.MySQLDatabase) else [EventCounter.name]
    return EventCounter.insert({EventCounter.name: raw(name), EventCounter.value: 1}).on_conflict(
        conflict_target=target, update={EventCounter.value: EventCounter.value + 1}
    )


_TAKE_TURN: Prepared[EventCounter] = Prepared(_take_turn, 1)


def take_turn(name: str) -> None:
    """Wait until no other transaction is between its take_turn(name) and its end, and
    hold the turn until this one ends: a create's INSERT comes after every earlier
    create's COMMIT, so ids (taken at the INSERT) are in the order rows become visible.

    Without it, PostgreSQL's sequences and InnoDB's AUTO_INCREMENT let a create that
    has its id and then waits (on a unique key another transaction holds, on a slow
    disk) commit after a later create with a higher id: a keyset walk that has passed
    the higher id never lists the lower one, and the contract says rows created during
    a walk are not skipped. The turn is the row lock of a counter of creates, taken by
    an upsert whose count nobody reads: on PostgreSQL it goes in the round trip of the
    INSERT after it. SQLite has one writer at a time already."""
    if engine.kind() != "sqlite":
        _TAKE_TURN.execute_later(name)


def set_at_least(name: str, value: int) -> None:
    """Raise a counter to value unless it is above it already (made when missing)."""
    counter = EventCounter.name == name
    higher = pw.Case(None, [(EventCounter.value < value, value)], EventCounter.value)
    if EventCounter.update(value=higher).where(counter).execute() == 0:
        try:
            with proxy.atomic():
                EventCounter.insert(name=name, value=value).execute()
        except pw.IntegrityError:
            set_at_least(name, value)
