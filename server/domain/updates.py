"""Update masks (AIP-134, AIP-161) and etags (AIP-154) shared by UpdateStudent and UpdateCourse."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from enrollment.server.domain.retries import checked
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import EtagMismatch
from enrollment.server.persistence.models import utcnow

MASK_FIELD = "update_mask"


def etag_of(version: int) -> str:
    """Opaque to callers; it changes exactly when the version (the mutable fields) does."""
    return f'W/"{version}"'


def masked_paths(
    fields: Fields,
    paths: Sequence[str],
    values: Mapping[str, object],
    *,
    resource: str,
    output_only: Sequence[str],
) -> set[str]:
    """The mutable fields to change. values: each mutable field's value in the request.

    "*" alone is every mutable field; no paths at all is every mutable field whose
    value is not its default (zero, empty). Any other path is a violation on
    update_mask, as is a path named twice or "*" beside others; a wrong mask chooses
    nothing, so the values are not checked.
    """
    if not paths:
        return {name for name, value in values.items() if value}
    chosen: set[str] = set()
    seen: set[str] = set()
    found = len(fields.violations)
    for path in paths:
        if path in seen:
            fields.invalid(MASK_FIELD, f'names "{path}" more than once')
            continue
        seen.add(path)
        if path == "*":
            if len(paths) > 1:
                fields.invalid(MASK_FIELD, '"*" must be the only path')
            chosen.update(values)
        elif path in values:
            chosen.add(path)
        elif not path:
            fields.invalid(MASK_FIELD, "holds an empty path")
        elif path in output_only:
            fields.invalid(MASK_FIELD, f'"{path}" cannot be updated (output only, or the name)')
        else:
            fields.invalid(
                MASK_FIELD, f'"{path[:64]}" is not a field of {resource} that can be updated'
            )
    # A mask that is wrong says nothing about which values to check: report it alone.
    return chosen if len(fields.violations) == found else set()


class Versioned(Protocol):
    @property
    def version(self) -> int: ...


Row = TypeVar("Row", bound=Versioned)
# A mutable field's check: Fields' method for it (Fields.name, ...), given the field's
# name in the request; it returns the value to store.
Check = Callable[[Fields, str, Any], Any]


@dataclass(frozen=True)
class Updatable(Generic[Row]):
    """How UpdateStudent or UpdateCourse changes its resource."""

    kind: str  # "student": the request's field prefix ("student.name") and the etag error's
    resource: str  # "Student", as a mask error names it
    checks: Mapping[str, Check]  # each mutable field, in the order its checks run
    output_only: Sequence[str]
    find: Callable[[int], Row]  # the row, locked until the transaction ends
    apply: Callable[[Row, dict[str, Any], dt.datetime], Row]  # the one place it is changed


def update(
    updatable: Updatable[Row], resource_id: int, etag: str, paths: Sequence[str], **values: Any
) -> Row:
    """An Update* call's checks in contract order (INVALID_FIELD, NOT_FOUND, ETAG_MISMATCH),
    then updatable.apply of the chosen fields whose values differ, if any (the resource's
    own errors come from there). values: each mutable field's value in the request."""
    fields = Fields()
    fields.required_id(f"{updatable.kind}.id", resource_id)
    chosen = masked_paths(
        fields, paths, values, resource=updatable.resource, output_only=updatable.output_only
    )
    for name, check in updatable.checks.items():
        if name in chosen:
            values[name] = check(fields, f"{updatable.kind}.{name}", values[name])
    checked(fields)
    row = updatable.find(resource_id)
    if etag and etag != etag_of(row.version):
        raise EtagMismatch.of(updatable.kind, resource_id)
    changes = {name: values[name] for name in chosen if getattr(row, name) != values[name]}
    return updatable.apply(row, changes, utcnow()) if changes else row
