"""What students and courses share: a row created under a unique key, a list read by keyset."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import peewee as pw

from enrollment.server.domain import page_tokens
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import EnrollmentError
from enrollment.server.persistence import outbox
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.steps import Step
from enrollment.server.persistence.unit_of_work import savepoint

M = TypeVar("M", bound=pw.Model)


def create_unique(
    model: type[M], key: pw.Field, taken: Callable[[], EnrollmentError], turn: str, **values: Any
) -> M:
    """Insert one row; when its unique key is already held (the unique index decides, not
    a look-up first) the insert is undone to its savepoint and taken() is raised.

    Creates of one kind take turn `turn` (outbox.take_turn) first, so that ids are in
    commit order and a keyset walk never passes a row that is still to appear.

    Another constraint's refusal is no taken key: a primary key that collides because
    PostgreSQL's id sequence lags behind the table (after a restore or an import that
    wrote ids itself) goes up as it is, an internal error, not as taken(), which would
    send the caller after a duplicate that does not exist."""
    outbox.take_turn(turn)
    try:
        with savepoint():
            return model.create(**values)
    except pw.IntegrityError:
        if model.select().where(key == values[key.name]).exists():
            raise taken() from None
        raise


def list_page(
    kind: page_tokens.Kind,
    *,
    filter_field: str,
    filter_id: int,
    page_size: int,
    page_token: str,
    every_row: Prepared[M],
    filtered: Prepared[M],
    find_filter: Callable[[int], Generator[Step, list[Any], object]],
) -> Generator[Step, list[Any], tuple[list[M], str]]:
    """The steps of one page of a List* call (persistence/steps.py): its rows and the
    next page token.

    every_row: the keyset query without a filter (filter id 0); filtered: the one taking
    the filter id first; find_filter: the steps that raise NOT_FOUND for a filter id that
    names nothing.
    """
    fields = Fields()
    page = fields.page_request(
        kind,
        filter_field=filter_field,
        filter_id=filter_id,
        page_size=page_size,
        page_token=page_token,
    )
    fields.check()
    if page.filter_id:
        rows, token = yield from page.fetch(filtered, page.filter_id)
    else:
        rows, token = yield from page.fetch(every_row)
    # An empty filtered page and a filter naming nothing look alike; only then ask which.
    if page.filter_id and not rows:
        yield from find_filter(page.filter_id)
    return rows, token
