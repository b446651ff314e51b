"""Safe retries (AIP-155): a mutating call's request_id, its recorded outcome, and replays.

One mechanism for every mutating function. The transport wraps a call that carries a
request_id in `run_once` with its Key (method, id, fingerprint of the request without
the id, and how to encode the domain's result as the response). Inside the call's
transaction, every function decorated `@mutation` calls `checked(fields)` in place of
`fields.check()`: the id's form is checked with the other fields, then the id is
claimed by inserting its record before any other check. A concurrent duplicate blocks
on that primary key until the first transaction ends: it then replays the committed
response, or, when the first rolled back, runs itself. When the function returns, the
encoded response is written into the record, still in the same transaction, so the
effect and its record commit together or not at all.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from enrollment.server.domain.validation import Fields
from enrollment.server.errors import RequestIdReused
from enrollment.server.persistence.models import RequestRecord, utcnow
from enrollment.server.persistence.prepared import Prepared, raw
from enrollment.server.persistence.unit_of_work import in_line, sharing, transactional

P = ParamSpec("P")
R = TypeVar("R")

FIELD = "request_id"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NIL = "00000000-0000-0000-0000-000000000000"

# The claim: a held id inserts nothing instead of failing (ON CONFLICT DO NOTHING, INSERT
# OR IGNORE, INSERT IGNORE), so no savepoint is needed around it on any database; a
# concurrent duplicate still waits on the primary key for the first transaction to end.
_CLAIM: Prepared[RequestRecord] = Prepared(
    lambda request_id, method, fingerprint, create_time: RequestRecord.insert(
        {
            RequestRecord.request_id: raw(request_id),
            RequestRecord.method: raw(method),
            RequestRecord.fingerprint: raw(fingerprint),
            RequestRecord.response: b"",
            RequestRecord.create_time: create_time,
        }
    ).on_conflict_ignore(),
    4,
)
_RECORD_RESPONSE: Prepared[RequestRecord] = Prepared(
    lambda response, request_id: RequestRecord.update(
        {RequestRecord.response: raw(response)}
    ).where(RequestRecord.request_id == raw(request_id)),
    2,
)


def canonical(request_id: str) -> str | None:
    """The id's canonical lower-case form, or None when it is no UUID or the nil UUID."""
    lowered = request_id.lower()
    if not _UUID.fullmatch(lowered) or lowered == _NIL:
        return None
    return lowered


@dataclass(frozen=True)
class Key:
    """What identifies a call for deduplication."""

    method: str
    request_id: str  # as the caller sent it (not empty)
    fingerprint: str  # sha256 hex of the request without its request_id
    encode: Callable[[Any], bytes]  # the domain's result as the serialized response


class Replayed(Exception):
    """The call was recorded before: its response, instead of running it again."""

    def __init__(self, response: bytes) -> None:
        super().__init__("replayed")
        self.response = response


@dataclass
class _Call:
    key: Key
    claimed: str | None = None  # the canonical id, once its record is ours
    response: bytes | None = None


_current: ContextVar[_Call | None] = ContextVar("request_id_call", default=None)


def run_once(key: Key, run: Callable[[], object]) -> bytes:
    """Run the call (a @mutation function) under key; the serialized response, recorded
    now or replayed from an earlier call with the same request_id."""
    call = _Call(key)
    token = _current.set(call)
    try:
        run()
    except Replayed as replay:
        return replay.response
    finally:
        _current.reset(token)
    if call.response is None:
        raise RuntimeError(f"{key.method} never claimed its request_id")
    return call.response


def checked(fields: Fields) -> None:
    """fields.check() for a mutating call: the call's request_id is checked with the other
    fields, then claimed before any other check (a replay or REQUEST_ID_REUSED here)."""
    call = _current.get()
    request_id = None
    if call is not None:
        call.claimed = None
        request_id = canonical(call.key.request_id)
        if request_id is None:
            fields.invalid(
                FIELD, "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000 (not nil)"
            )
    fields.check()
    if call is not None and request_id is not None:
        _claim(call, request_id)


def _claim(call: _Call, request_id: str) -> None:
    key = call.key
    for _ in range(3):
        # Insert first: a concurrent call with this id waits here for ours to end.
        claimed = in_line(_CLAIM.execute, request_id, key.method, key.fingerprint, utcnow())
        if claimed != 1:
            query = RequestRecord.select().where(RequestRecord.request_id == request_id)
            found = sharing(query).first()
            if found is None:
                continue  # purged in between: claim again
            if found.method != key.method or found.fingerprint != key.fingerprint:
                raise RequestIdReused.of(FIELD)
            raise Replayed(bytes(found.response))
        call.claimed = request_id
        return
    raise RuntimeError("request record neither insertable nor readable")


def mutation(fn: Callable[P, R]) -> Callable[P, R]:
    """A writing unit of work whose successful result is recorded, in its transaction,
    when the call carries a request_id (the function calls checked(fields))."""

    @transactional(write=True)
    @functools.wraps(fn)
    def recorded(*args: P.args, **kwargs: P.kwargs) -> R:
        result = fn(*args, **kwargs)
        call = _current.get()
        if call is not None and call.claimed is not None:
            call.response = call.key.encode(result)
            # The claim stored an empty response: an empty one (DropCourse without a
            # promotion, the deletes) is recorded already, one UPDATE fewer.
            if call.response:
                _RECORD_RESPONSE.execute_later(call.response, call.claimed)
        return result

    return recorded


@transactional(write=True)
def purge_expired(retention: dt.timedelta, limit: int = 500) -> int:
    """Delete up to `limit` records older than retention, oldest first; how many went.
    Small batches in short transactions, so callers never wait long behind a purge."""
    cutoff = utcnow() - retention
    expired = [
        row.request_id
        for row in RequestRecord.select(RequestRecord.request_id)
        .where(RequestRecord.create_time < cutoff)
        .order_by(RequestRecord.create_time)
        .limit(limit)
    ]
    if not expired:
        return 0
    deleted: int = (
        RequestRecord.delete()
        .where(RequestRecord.request_id.in_(expired) & (RequestRecord.create_time < cutoff))
        .execute()
    )
    return deleted
