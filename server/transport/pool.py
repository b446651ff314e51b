"""The threads that run the calls' synchronous work (peewee), handed over from the loop.

A call waits for its thread as a coroutine on the event loop, holding no thread; the
queue between them is unbounded because grpc bounds the calls in flight
(--max-concurrent-rpcs). This is concurrent.futures.ThreadPoolExecutor with what a
call does not need taken out (a Future with its Condition per call, the semaphore of
lazily started threads): one queue put on the way in, one call_soon_threadsafe on the
way out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

# (loop, future, fn, args); loop None: a thread's call (WorkerPool.call), future a
# concurrent one.
_Work = tuple[
    "asyncio.AbstractEventLoop | None",
    "asyncio.Future[Any] | concurrent.futures.Future[Any]",
    Callable[..., Any],
    tuple[Any, ...],
]


class WorkerPool:
    def __init__(
        self,
        threads: int,
        name: str = "rpc",
        scope: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        """scope: what each thread runs its calls inside, from its start to its end."""
        # (loop, future, fn, args) per call; None ends a thread.
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._scope = scope
        self._shut = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """On the loop: run fn(*args) in a pool thread; the future has its result. A
        cancelled future does not cancel the work: it runs (or finishes) all the same."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queue.put((loop, answer, fn, args))
        return answer

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """From a thread that is not the loop's (a background purge): run fn(*args) in a
        pool thread, in line with the calls, and wait for its result. On PostgreSQL and
        MariaDB the pool's threads keep every connection of the process
        (startup/server.py), so work of the process's own goes through them too."""
        if self._shut:
            raise RuntimeError("the worker pool is shut down")
        answer: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((None, answer, fn, args))
        return answer.result()

    def _work(self) -> None:
        with self._scope():
            self._serve()

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, answer, fn, args = item
            try:
                outcome = (True, fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting call
                outcome = (False, exc)
            if loop is None:  # a thread waits (call)
                _settle(answer, outcome)
                continue
            # A closed loop (RuntimeError) has nobody waiting for this answer any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, answer, outcome)

    def shutdown(self) -> None:
        """Let the queued work finish, then end the threads; returns when they have."""
        self._shut = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


def _settle(
    answer: asyncio.Future[Any] | concurrent.futures.Future[Any], outcome: tuple[bool, Any]
) -> None:
    if answer.done():  # the call ended (cancelled) while its work ran
        return
    ok, value = outcome
    if ok:
        answer.set_result(value)
    else:
        answer.set_exception(value)
