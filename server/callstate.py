"""Whether the current call is still wanted: the transport binds a check, units of work ask it."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import TypeVar

from enrollment.server.errors import CallEnded

T = TypeVar("T")

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
    """The call's database work would have had to wait for a lock, and was told not to
    (without_waiting): nothing was done, and the work can run again where waiting holds
    nothing else up."""


# Whether the current call's database work may wait for a lock (the default). The
# transport runs some SQLite writes on the event loop first (transport/interceptors.py,
# LoopWrites), where a wait would hold up every call of the process.
_may_wait: ContextVar[bool] = ContextVar("call_may_wait", default=True)


def may_wait() -> bool:
    return _may_wait.get()


def without_waiting(fn: Callable[..., T], *args: object) -> T:
    """fn(*args), whose database work raises WouldWait instead of waiting for a lock."""
    token = _may_wait.set(False)
    try:
        return fn(*args)
    finally:
        _may_wait.reset(token)
