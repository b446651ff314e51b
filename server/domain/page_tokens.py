"""Opaque keyset page tokens (AIP-158), bound to the method and filter they were issued for."""

from __future__ import annotations

import base64
import enum
import re
import struct
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import peewee as pw

from enrollment.server.persistence import steps
from enrollment.server.persistence.prepared import Prepared

M = TypeVar("M", bound=pw.Model)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_VERSION = 1
_LAYOUT = struct.Struct(">BBqq")  # version, kind, filter id, last id returned


class Kind(enum.IntEnum):
    STUDENTS = 1
    COURSES = 2
    ENROLLMENTS = 3  # ListEnrollments in (course_id, student_id) order
    WAITLIST = 4  # ListEnrollments of one course's waiting entries, in line order


# ListEnrollments: version, kind, its three filters (student, course, state) and the
# last row's key (course_id, student_id; or join number, 0 in waitlist order).
_PAIR_LAYOUT = struct.Struct(">BBqqBqq")


_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")


class BadToken(ValueError):
    """The token is not one this method issued for this filter."""


def effective_page_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode(*, kind: Kind, filter_id: int, after_id: int) -> str:
    raw = _LAYOUT.pack(_VERSION, kind, filter_id, after_id)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _raw(token: str) -> bytes:
    """The bytes of a token as encode() made it: unpadded URL-safe base64 and nothing
    else (base64's decoder would skip any other character and decode the rest)."""
    if not _ALPHABET.fullmatch(token):
        raise ValueError("not URL-safe base64")
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def decode(token: str, *, kind: Kind, filter_id: int) -> int:
    """The last id of the previous page; 0 for an empty token (the first page)."""
    if not token:
        return 0
    try:
        raw = _raw(token)
        version, token_kind, token_filter, after_id = _LAYOUT.unpack(raw)
        assert isinstance(after_id, int)  # the layout's last field is a q
    except (ValueError, struct.error):  # binascii.Error is a ValueError
        raise BadToken("is not a page token issued by this method") from None
    if version != _VERSION or token_kind != kind or after_id < 1 or token_filter < 0:
        raise BadToken("is not a page token issued by this method")
    if token_filter != filter_id:
        raise BadToken("was issued for a different filter; start again without a page token")
    return after_id


def encode_pair(*, kind: Kind, filters: tuple[int, int, int], after: tuple[int, int]) -> str:
    raw = _PAIR_LAYOUT.pack(_VERSION, kind, *filters, *after)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_pair(token: str, *, kind: Kind, filters: tuple[int, int, int]) -> tuple[int, int] | None:
    """The key of the previous page's last row; None for an empty token (the first page)."""
    if not token:
        return None
    try:
        raw = _raw(token)
        version, token_kind, *rest = _PAIR_LAYOUT.unpack(raw)
    except (ValueError, struct.error):  # binascii.Error is a ValueError
        raise BadToken("is not a page token issued by this method") from None
    token_filters, after = tuple(rest[:3]), (rest[3], rest[4])
    if version != _VERSION or token_kind not in (Kind.ENROLLMENTS, Kind.WAITLIST):
        raise BadToken("is not a page token issued by this method")
    if min(*token_filters, *after) < 0 or after[0] < 1:
        raise BadToken("is not a page token issued by this method")
    if token_kind != kind or token_filters != filters:
        raise BadToken("was issued for a different filter; start again without a page token")
    return after


@dataclass(frozen=True)
class PageRequest:
    """A validated List* request: which rows (kind, filter) and where the page starts."""

    kind: Kind
    filter_id: int
    size: int
    after_id: int

    def fetch(
        self, query: Prepared[M], *filter_values: int
    ) -> Generator[steps.Step, list[Any], tuple[list[M], str]]:
        """`rows, token = yield from page.fetch(...)` (a step, persistence/steps.py): one
        keyset query for size + 1
        rows; the extra row says whether a next page exists.

        query: a Prepared query taking the filter values (if any), the last id of the
        previous page, and the row limit.
        """
        rows: list[M] = yield (query, (*filter_values, self.after_id, self.size + 1))
        if len(rows) <= self.size:
            return rows, ""
        rows = rows[: self.size]
        last: Any = rows[-1]  # a Student or a Course: both keyed by id
        return rows, encode(kind=self.kind, filter_id=self.filter_id, after_id=last.id)
