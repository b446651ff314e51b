"""Keeps grpc's core log lines off stderr where the command says the same in one line."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# grpc's core writes absl log lines ("E1129 22:22:43.909351    1115 add_port.cc:83] Failed
# to add port ...") straight to file descriptor 2; GRPC_VERBOSITY would silence every
# other line of the process too, and is read once, when grpc starts.
_BIND_LINE = re.compile(
    rb"^[IWEF]\d{4} [\d:.]+ +\d+ (add_port|chttp2_server|tcp_server\w*|resolve_address\w*)"
    rb"\.cc:\d+\]"
)


# Any line of grpc's core log.
_CORE_LINE = re.compile(rb"^[IWEF]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\]")


def quiet_bind() -> contextlib.AbstractContextManager[None]:
    """While grpc binds: its lines about binding are left out (the caller says it)."""
    return held_stderr(_BIND_LINE)


def quiet_core() -> contextlib.AbstractContextManager[None]:
    """For a one-shot command (health): every grpc core line is left out; the command
    prints its own one line. (GRPC_VERBOSITY is read when grpc is imported.)"""
    return held_stderr(_CORE_LINE)


@contextlib.contextmanager
def held_stderr(drop: re.Pattern[bytes]) -> Iterator[None]:
    """Hold what is written on file descriptor 2 for the while, then pass it on without
    the lines that match drop. Other threads' lines are delayed, not lost."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.readlines() if not drop.match(line)]
            if kept:
                os.write(2, b"".join(kept))
