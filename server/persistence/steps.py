"""Reads written as steps: the domain's rules without the I/O, driven by whoever runs them.

A read's domain function is a generator: it checks its arguments, yields each statement
it needs (a Prepared query and its values), is sent that statement's rows, and returns
its answer. The same rules then run two ways (so they stay in one place):

- in a pool thread, as a unit of work (Read.__call__: drive() runs each statement on
  the thread's connection through peewee, unit_of_work maps the failures);
- on the event loop, on PostgreSQL's asynchronous connections (persistence/loop_reads.py),
  where no thread is handed the call (bench/PROFILE.md, "nineteenth session").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Any, Generic, ParamSpec, TypeVar

from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.unit_of_work import transactional

P = ParamSpec("P")
R = TypeVar("R")

# One statement a read needs: the query and its values. A step yields it, and is sent
# the query's rows for those values (what query.rows(*values) returns).
Step = tuple[Prepared[Any], tuple[Any, ...]]
# A read's steps: yields Steps, is sent their rows, returns the read's answer.
Steps = Generator[Step, list[Any], R]


def drive(steps: Steps[R]) -> R:
    """Run a read's steps here, each statement on the current unit of work's connection."""
    try:
        query, values = next(steps)
        while True:
            query, values = steps.send(query.rows(*values))
    except StopIteration as done:
        result: R = done.value
        return result


class Read(Generic[P, R]):
    """A read whose answer is one statement (a second at most, to tell an empty result
    from a missing filter, which needs no common snapshot), written as steps.

    Called, it runs as a unit of work without a transaction (each statement is its own
    snapshot; unit_of_work's snapshot=False), named after the steps' function for
    tracing. read.steps(...) gives the steps themselves, for the event loop's driver.
    Used as the decorator of the domain's read steps."""

    def __init__(self, steps: Callable[P, Steps[R]]) -> None:
        self.steps = steps

        @functools.wraps(steps)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            return drive(steps(*args, **kwargs))

        # The unit of work (also what callers on a hot path call, one call less).
        self.run = transactional(write=False, snapshot=False)(run)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.run(*args, **kwargs)
