"""`python -m bench.nofeed [enrollment-server arguments]`: the server with the change
feed's recorders replaced by no-ops, for the "without the outbox" rows of
`python -m bench feed` only (never a way to run the service).

Every change calls one recorder of server/domain/events.py (student_created,
entry_changed, …); with them doing nothing, a write builds no snapshot, raises no
counter and inserts no event: what the write path costs without the feed. Everything
else (the unit of work, the request records, the watch hub) is the same code.
"""

from __future__ import annotations

import sys

from enrollment.server.domain import events
from enrollment.server.startup import cli

RECORDERS = (
    "student_created",
    "student_updated",
    "student_deleted",
    "course_created",
    "course_updated",
    "course_deleted",
    "entry_changed",
)


def _nothing(*_args, **_kwargs) -> None:
    return None


if __name__ == "__main__":
    for name in RECORDERS:
        getattr(events, name)  # fails loudly when a recorder is renamed
        setattr(events, name, _nothing)
    sys.exit(cli.main())
