"""Hot queries compiled to SQL once per database; a call only binds its values."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

import peewee as pw

from enrollment.server.persistence.models import proxy

# Stand-ins for the parameters while a query is compiled; no id, size or count is this low.
_MARKER = -(2**62)


def raw(value) -> pw.Value:
    """A parameter passed to the driver as it is: a text or blob field would otherwise turn
    the compile-time marker into text, and the call's value is already what the driver
    takes (str, bytes)."""
    return pw.Value(value, converter=False)


class Prepared:
    """A peewee query built once with marker values, its SQL reused with each call's values.

    Peewee compiles a query to SQL on every execution, and for a one-row lookup that
    costs several times the lookup itself (`make bench-micro`; bench/PROFILE.md). The
    SQL depends only on the database (its quoting and placeholders), so it is compiled
    on first use and again only when the models are bound to another database.
    """

    def __init__(self, build: Callable[..., pw.Query], arity: int, *, plain: bool = False) -> None:
        """plain: rows() returns read-only named tuples of the selected fields instead of
        model instances, for rows only read (a page turned into protobuf messages):
        building a peewee instance per row cost more than the rest of the row's work."""
        self._build = build
        self._markers = tuple(_MARKER - i for i in range(arity))
        self._plain = plain
        self._compiled: tuple | None = None  # (database, model, sql, binding, converters)

    def _compile(self) -> tuple:
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
            if all(is_value for is_value, _ in binding):
                binding = None  # the common case: the values are the parameters
            # What peewee's own row wrapper does for a plain model select: each column
            # through its field's python_value, the instance built without defaults.
            fields = getattr(query, "selected_columns", None) or ()
            converters = tuple((f.name, f.python_value) for f in fields)
            model = query.model
            if self._plain:
                model = namedtuple(f"{model.__name__}Row", [name for name, _ in converters])  # type: ignore[misc]  # noqa: PYI024
            compiled = self._compiled = (db, model, sql, binding, converters)
        return compiled

    def _params(self, binding, values: tuple) -> tuple:
        if binding is None:
            return values
        return tuple(values[v] if is_value else v for is_value, v in binding)

    def rows(self, *values) -> list:
        """The model instances a SELECT of one model's fields returns (named tuples when
        plain)."""
        _, model, sql, binding, converters = self._compile()
        cursor = proxy.execute_sql(sql, self._params(binding, values))
        if self._plain:
            convert = [c for _, c in converters]
            return [
                model._make([f(v) for f, v in zip(convert, row, strict=True)])
                for row in cursor.fetchall()
            ]
        found = []
        for row in cursor.fetchall():
            data = {name: convert(v) for (name, convert), v in zip(converters, row, strict=True)}
            # Private names, as in peewee's own wrapper: model(**data) would compute
            # every default first (tests/test_private_internals.py guards them).
            instance = model(__no_default__=1, **data)
            instance._dirty.clear()
            found.append(instance)
        return found

    def value_rows(self, *values) -> list[dict]:
        """Each row as {field name: value}, converted as rows() does but with no model
        instance built (a snapshot needs the values only)."""
        _, _, sql, binding, converters = self._compile()
        cursor = proxy.execute_sql(sql, self._params(binding, values))
        return [
            {name: convert(v) for (name, convert), v in zip(converters, row, strict=True)}
            for row in cursor.fetchall()
        ]

    def first(self, *values):
        """The first row of a SELECT, or None."""
        rows = self.rows(*values)
        return rows[0] if rows else None

    def execute(self, *values) -> int:
        """Run an INSERT, UPDATE or DELETE; the number of rows it changed."""
        _, _, sql, binding, _ = self._compile()
        cursor = proxy.execute_sql(sql, self._params(binding, values))
        return cursor.rowcount
