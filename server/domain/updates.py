"""Update masks (AIP-134, AIP-161) and etags (AIP-154) shared by UpdateStudent and UpdateCourse."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from enrollment.server.domain.validation import Fields

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
