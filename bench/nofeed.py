"""`python -m bench.nofeed [enrollment-server arguments]`: the server with the change
feed's recorders replaced by no-ops, for the "without the outbox" rows of
`python -m bench feed` only (never a way to run the service); `make bench-micro` and
`make bench-icount` use without_feed() in-process for their "no change feed" rows, and
bench-icount without_feed_statements() for the feed's Python alone.

Every change calls one recorder of server/domain/events.py (student_created,
entry_changed, …); with them doing nothing, a write builds no snapshot, raises no
counter and inserts no event: what the write path costs without the feed. Everything
else (the unit of work, the request records, the watch hub) is the same code.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from enrollment.server.domain import events
from enrollment.server.persistence import outbox
from enrollment.server.startup import cli

RECORDERS = (
    "student_created",
    "student_updated",
    "student_deleted",
    "course_created",
    "course_updated",
    "course_deleted",
    "entry_changed",
    "course_after",
)


def _nothing(*_args, **_kwargs) -> None:
    return None


@contextlib.contextmanager
def without_feed() -> Iterator[None]:
    """In this process, every change-feed recorder does nothing until the block ends."""
    saved = {name: getattr(events, name) for name in RECORDERS}  # fails when one is renamed
    for name in RECORDERS:
        setattr(events, name, _nothing)
    try:
        yield
    finally:
        for name, recorder in saved.items():
            setattr(events, name, recorder)


def _write_nothing(rows: list[outbox.Row]) -> int:
    """outbox.write without its statements: the domain's finishers made the snapshots
    and their JSON (take()), and the rows are dropped unwritten."""
    return 0


@contextlib.contextmanager
def without_feed_statements() -> Iterator[None]:
    """In this process, the change feed does all its Python (recorders, snapshots, JSON)
    but runs none of its statements (no counter, no event row) until the block ends."""
    saved = outbox.write
    outbox.write = _write_nothing
    try:
        yield
    finally:
        outbox.write = saved


if __name__ == "__main__":
    with without_feed():
        sys.exit(cli.main())
