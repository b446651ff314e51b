"""Hot queries compiled to SQL once per database; a call only binds its values."""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import peewee as pw

from enrollment.server.persistence.models import proxy

# Stand-ins for the parameters while a query is compiled; no id, size or count is this low.
_MARKER = -(2**62)

M = TypeVar("M", bound=pw.Model)
# Per selected column: its field's name, python_value, and the types kept (see _kept).
_Converters = tuple[tuple[str, Callable[[Any], Any], frozenset[type]], ...]
# (database, model, sql, binding, converters)
_Compiled = tuple[Any, Any, str, Any, _Converters]


# Every Prepared made (they are module constants), for to_prepare().
_made: list[Prepared[Any]] = []


def to_prepare() -> list[str]:
    """The statements worth preparing on the serving pool's connections (engine.py):
    the SQL of every Prepared INSERT, for the database the models are bound to.

    INSERTs only: PostgreSQL plans a prepared statement once for all values (a generic
    plan) after a few runs, with the tables as they are then, and keeps that plan while
    the connection lasts. A lookup planned while its table was nearly empty (a new
    database's first minutes) then scans the whole table for every call as it grows:
    seen here as a write mix growing slower round after round (bench/PROFILE.md, tenth
    session). An INSERT … VALUES has no plan to choose."""
    inserts = [q for q in _made if isinstance(q._build(*q._markers), pw.Insert)]
    return [query._compile()[2] for query in inserts]


def raw(value: object) -> pw.Value:
    """A parameter passed to the driver as it is: a text or blob field would otherwise turn
    the compile-time marker into text, and the call's value is already what the driver
    takes (str, bytes)."""
    return pw.Value(value, converter=False)


def writes_return_rows() -> bool:
    """Whether the database the models are bound to runs INSERT, UPDATE and DELETE …
    RETURNING: SQLite from 3.35, PostgreSQL. Not MariaDB (no UPDATE … RETURNING) or
    MySQL (none at all), which the same URL scheme reaches."""
    db = proxy.obj
    if isinstance(db, pw.SqliteDatabase):
        return sqlite3.sqlite_version_info >= (3, 35)
    return isinstance(db, pw.PostgresqlDatabase)


def _kept(field: pw.Field) -> frozenset[type]:
    """The types of value field.python_value returns unchanged, which a row then keeps
    without the call: int for an integer field, str for a text field, and None for both
    (peewee's own Field.python_value, IntegerField.adapt and the text fields' adapt do
    just that). None of them for any other field, or one whose conversion is its own:
    two Python calls less for most columns of a row."""
    kind = type(field)
    if kind.python_value is pw.Field.python_value:
        if kind.adapt is pw.IntegerField.adapt:
            return frozenset({int, type(None)})
        if kind.adapt is pw.TextField.adapt:  # every text field's (CharField's too)
            return frozenset({str, type(None)})
    return frozenset()


def _values(converters: _Converters, row: tuple[Any, ...]) -> dict[str, Any]:
    """{field name: value}, each value as the field's python_value makes it."""
    return {
        name: v if type(v) in kept else convert(v)
        for (name, convert, kept), v in zip(converters, row, strict=True)
    }


def _row_type(model_name: str, fields: list[str]) -> Any:
    """The read-only row type of a plain Prepared: a named tuple of its fields."""
    return namedtuple(f"{model_name}Row", fields)  # noqa: PYI024


class Prepared(Generic[M]):
    """A peewee query built once with marker values, its SQL reused with each call's values.

    Peewee compiles a query to SQL on every execution, and for a one-row lookup that
    costs several times the lookup itself (`make bench-micro`; bench/PROFILE.md). The
    SQL depends only on the database (its quoting and placeholders), so it is compiled
    on first use and again only when the models are bound to another database. M is the
    model a SELECT's rows are (for other statements, the model they change).
    """

    def __init__(self, build: Callable[..., pw.Query], arity: int, *, plain: bool = False) -> None:
        """plain: rows() returns read-only named tuples of the selected fields instead of
        model instances, for rows only read (a page turned into protobuf messages):
        building a peewee instance per row cost more than the rest of the row's work."""
        self._build = build
        self._markers = tuple(_MARKER - i for i in range(arity))
        self._plain = plain
        self._compiled: _Compiled | None = None
        _made.append(self)

    def _compile(self) -> _Compiled:
        db = proxy.obj
        compiled = self._compiled
        if compiled is None or compiled[0] is not db:
            query = self._build(*self._markers)
            sql, params = query.sql()
            # Each parameter is a call's value (its index) or a constant of the query.
            binding = tuple(
                (True, self._markers.index(p))
                if isinstance(p, int) and p in self._markers
                else (False, p)
                for p in params
            )
            if [b for b in binding if b[0]] != [(True, i) for i in range(len(self._markers))]:
                raise ValueError(f"every value must appear once, in order: {sql}")
            # What peewee's own row wrapper does for a plain model select: each column
            # through its field's python_value, the instance built without defaults.
            # (A SELECT's columns, or what a write query's RETURNING gives back.)
            fields = (
                getattr(query, "selected_columns", None) or getattr(query, "_returning", None) or ()
            )
            converters = tuple((f.name, f.python_value, _kept(f)) for f in fields)
            # The common case, binding None: the values are the parameters.
            bound = None if all(is_value for is_value, _ in binding) else binding
            # Every query here is a model's (peewee's stubs declare model on some kinds only).
            model: Any = query.model  # type: ignore[attr-defined]
            if self._plain:
                model = _row_type(model.__name__, [name for name, _, _ in converters])
            compiled = self._compiled = (db, model, sql, bound, converters)
        return compiled

    def _params(
        self, binding: tuple[tuple[bool, Any], ...] | None, values: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        if binding is None:
            return values
        return tuple(values[v] if is_value else v for is_value, v in binding)

    def rows(self, *values: Any) -> list[M]:
        """The model instances a SELECT of one model's fields returns (named tuples of
        the same fields when plain, typed as the model: they are only read); or those
        an INSERT, UPDATE or DELETE … RETURNING of the model's fields gives back."""
        compiled = self._compile()
        cursor = proxy.execute_sql(compiled[2], self._params(compiled[3], values))
        return self._made(compiled, cursor.fetchall())

    def statement(self, values: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        """The SQL and the driver's parameters for these values (for a connection of
        the same database that is not peewee's: persistence/loop_reads.py)."""
        _, _, sql, binding, _ = self._compile()
        return sql, self._params(binding, values)

    def made(self, fetched: list[tuple[Any, ...]]) -> list[M]:
        """What rows() returns, of the driver's rows for statement()."""
        return self._made(self._compile(), fetched)

    def _made(self, compiled: _Compiled, fetched: list[tuple[Any, ...]]) -> list[M]:
        _, model, _, _, converters = compiled
        if self._plain:
            convert = [(c, kept) for _, c, kept in converters]
            tuples: list[M] = [
                model._make(
                    [
                        v if type(v) in kept else f(v)
                        for (f, kept), v in zip(convert, row, strict=True)
                    ]
                )
                for row in fetched
            ]
            return tuples
        found: list[M] = []
        for row in fetched:
            # Private names of peewee (tests/test_private_internals.py guards them):
            # __no_default__ leaves the defaults uncomputed and nothing marked changed,
            # as peewee's own row wrapper does; the values then go in as the instance's
            # __data__ at once, where model(**data) would set them one by one through
            # each field's accessor.
            instance = model(__no_default__=1)
            instance.__data__ = _values(converters, row)
            found.append(instance)
        return found

    def first(self, *values: Any) -> M | None:
        """The first row of a SELECT, or None."""
        rows = self.rows(*values)
        return rows[0] if rows else None

    def execute(self, *values: Any) -> int:
        """Run an INSERT, UPDATE or DELETE; the number of rows it changed."""
        _, _, sql, binding, _ = self._compile()
        cursor = proxy.execute_sql(sql, self._params(binding, values))
        count: int = cursor.rowcount
        return count

    def execute_later(self, *values: Any) -> None:
        """Run an INSERT, UPDATE or DELETE whose count nobody reads: on PostgreSQL's
        serving pool it goes in the round trip of the transaction's next statement
        (engine.PooledPostgresDatabase), elsewhere now."""
        db, _, sql, binding, _ = self._compile()
        later = getattr(db, "execute_later", None)
        if later is None:
            db.execute_sql(sql, self._params(binding, values))
        else:
            later(sql, self._params(binding, values))
