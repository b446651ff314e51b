"""Whether the current call is still wanted: the transport binds a check, units of work ask it."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

from enrollment.server.errors import CallEnded

_is_active: ContextVar[Callable[[], bool] | None] = ContextVar("call_is_active", default=None)


def bind(is_active: Callable[[], bool]) -> Token:
    """Bind the current call's liveness check to this context (the transport binds it to
    the call's state and runs the call's database work in a copy of the context)."""
    return _is_active.set(is_active)


def unbind(token: Token) -> None:
    _is_active.reset(token)


def ensure_active() -> None:
    """Raise CallEnded when the caller's deadline passed or it cancelled."""
    is_active = _is_active.get()
    if is_active is not None and not is_active():
        raise CallEnded.of()
