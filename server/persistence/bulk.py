"""Statements over many rows at once (batches), with their SQL written here directly.

peewee compiles every value of a query as a node of its own: for a batch of 1000 items
that cost more CPU than the database took to run the statement (an INSERT of 1000
entries: about 50 ms of compiling on SQLite). These helpers write the same SQL as text
with one parameter marker per value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import peewee as pw

from enrollment.server.persistence.models import proxy


def _quote(name: str) -> str:
    open_, close = proxy.obj.quote
    return f"{open_}{name}{close}"


def ids_in(field: pw.Field, ids: Sequence[int]) -> pw.SQL:
    """WHERE field IN (ids), ids not empty."""
    marks = ", ".join([proxy.obj.param] * len(ids))
    return pw.SQL(f"{_quote(field.column_name)} IN ({marks})", list(ids))


def pairs_in(outer: pw.Field, inner: pw.Field, pairs: Iterable[tuple[int, int]]) -> pw.SQL | None:
    """WHERE (outer, inner) is one of pairs, as (outer = a AND inner IN (b, c, …)) OR …
    per value of outer (a tuple IN list is not SQL every database takes); None for no
    pairs."""
    grouped: dict[int, list[int]] = {}
    for a, b in sorted(pairs):
        grouped.setdefault(a, []).append(b)
    if not grouped:
        return None
    mark = proxy.obj.param
    left, right = _quote(outer.column_name), _quote(inner.column_name)
    terms, params = [], []
    for a, bs in grouped.items():
        terms.append(f"({left} = {mark} AND {right} IN ({', '.join([mark] * len(bs))}))")
        params += [a, *bs]
    return pw.SQL(f"({' OR '.join(terms)})", params)


def insert_rows(
    model: type[pw.Model], fields: Sequence[pw.Field], rows: list[tuple[Any, ...]]
) -> None:
    """One INSERT of rows (values in the order of fields), converted as peewee would."""
    if not rows:
        return
    names = ", ".join(_quote(field.column_name) for field in fields)
    one = f"({', '.join([proxy.obj.param] * len(fields))})"
    params = [f.db_value(value) for row in rows for f, value in zip(fields, row, strict=True)]
    table = _quote(model._meta.table_name)
    values = ", ".join([one] * len(rows))
    proxy.execute_sql(f"INSERT INTO {table} ({names}) VALUES {values}", params)
