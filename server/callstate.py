"""Whether the current call is still wanted: the transport binds a check, units of work ask it."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

from enrollment.server.errors import CallEnded

_is_active: ContextVar[Callable[[], bool] | None] = ContextVar("call_is_active", default=None)


def bind(is_active: Callable[[], bool]) -> Token[Callable[[], bool] | None]:
    """Bind the current call's liveness check to this context (the transport binds it to
    the call's state and runs the call's database work in a copy of the context)."""
    return _is_active.set(is_active)


def unbind(token: Token[Callable[[], bool] | None]) -> None:
    _is_active.reset(token)


def ensure_active() -> None:
    """Raise CallEnded when the caller's deadline passed or it cancelled."""
    is_active = _is_active.get()
    if is_active is not None and not is_active():
        raise CallEnded.of()


# Who made the current call, for the change feed: (x-request-id, token name or "").
_caller: ContextVar[tuple[str, str]] = ContextVar("caller", default=("", ""))


def bind_caller(request_id: str, actor: str) -> Token[tuple[str, str]]:
    """Bind the call's x-request-id and its token's name ("" without auth)."""
    return _caller.set((request_id, actor))


def unbind_caller(token: Token[tuple[str, str]]) -> None:
    _caller.reset(token)


def caller() -> tuple[str, str]:
    """(request_id, actor) of the current call; ("", "") outside one."""
    return _caller.get()


class WouldWait(Exception):  # noqa: N818 (not an error: a signal to the transport)
    """A write run on the event loop would have had to wait for another process's lock
    on the SQLite file (persistence/unit_of_work.py, LoopTurn): nothing was done, and
    the transport runs it again in the writer thread, where waiting holds nothing up."""
