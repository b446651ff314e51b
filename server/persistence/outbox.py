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
statement to their commit (not while they check and lock their rows). bench/PROFILE.md
has the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

import peewee as pw

from enrollment.server.persistence.models import PURGED, SEQUENCE, EventCounter, proxy
from enrollment.server.persistence.prepared import Prepared


class _Pending:
    __slots__ = ("data", "finishers", "rows")

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
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


def add(row: dict[str, Any]) -> None:
    """One event's columns, all but sequence; numbered in the order added."""
    _current().rows.append(row)


def flush() -> int:
    """Number and insert the pending events; the last statements before the commit.
    Returns how many were written."""
    pending = _pending.get()
    if pending is None:
        return 0
    while pending.finishers:
        pending.finishers.pop(0)()
    rows, pending.rows = pending.rows, []
    if not rows:
        return 0
    last = advance(SEQUENCE, len(rows))
    sql = _insert_sql()
    for offset, row in enumerate(rows, start=last - len(rows) + 1):
        proxy.execute_sql(sql, (offset, *(row[name] for name in _COLUMNS[1:])))
    return len(rows)


_COLUMNS = (
    "sequence", "event_time", "type", "student_id", "course_id", "payload", "request_id", "actor"
)  # fmt: skip
_insert: tuple[object, str] | None = None


def _insert_sql() -> str:
    """The INSERT of one event, written once per database: peewee would compile it on
    every call (the Prepared helper cannot mark text values), which cost more than the
    insert itself."""
    global _insert
    db = proxy.obj
    if _insert is None or _insert[0] is not db:
        open_, close = db.quote
        names = ", ".join(f"{open_}{c}{close}" for c in _COLUMNS)
        marks = ", ".join([db.param] * len(_COLUMNS))
        _insert = (db, f"INSERT INTO {open_}events{close} ({names}) VALUES ({marks})")
    return _insert[1]


def advance(name: str, by: int) -> int:
    """Raise a counter by `by` and return its new value, holding its row locked until
    the transaction ends. The row is made by the first use (migration 005 inserts none,
    so that rolling back an unused feed drops no rows): when two first writers race,
    the second one's insert waits for the first's commit, fails, and updates instead."""
    if _ADVANCE[name].execute(by) == 0:
        try:
            with proxy.atomic():  # a savepoint: the duplicate leaves the transaction usable
                EventCounter.insert(name=name, value=by).execute()
            return by
        except pw.IntegrityError:
            if _ADVANCE[name].execute(by) != 1:
                raise
    counter = _COUNTER[name].first()
    assert counter is not None  # made above when missing
    value: int = counter.value
    return value


def _advance(name: str) -> Prepared[EventCounter]:
    # The name is a constant of the SQL (a text value cannot be a Prepared marker).
    return Prepared(
        lambda by: EventCounter.update(value=EventCounter.value + by).where(
            EventCounter.name == name
        ),
        1,
    )


def _counter(name: str) -> Prepared[EventCounter]:
    return Prepared(lambda: EventCounter.select().where(EventCounter.name == name), 0)


_ADVANCE = {name: _advance(name) for name in (SEQUENCE, PURGED)}
_COUNTER = {name: _counter(name) for name in (SEQUENCE, PURGED)}


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
