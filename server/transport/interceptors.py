"""Wraps each call: auth, errors to statuses, metrics, one log line; bounds a request's arrival.

The server is grpc.aio (see startup/server.py): a call waiting for its request, or for
a thread, is a coroutine on the event loop and holds no thread. Every method with a
single request message is registered with grpc as request-streaming (the wire is the
same for the client), so its handler starts as soon as the call's headers arrive and
waits for the message itself, on the loop, for at most --request-timeout seconds; a
call whose message has not arrived by then is ended with DEADLINE_EXCEEDED /
REQUEST_TIMEOUT. grpc's own unary handling would wait for the message without any
bound. Only then does an EnrollmentService call go to the bounded thread pool, where
the synchronous database work runs: one thread per call being served, none per call
waiting. (Start-up names the calls that run on the loop instead: SQLite's cheap reads
and small writes, and PostgreSQL's cheap reads, driven on asynchronous connections.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs for it

from enrollment.server import callstate
from enrollment.server.callstate import WouldWait
from enrollment.server.errors import (
    CallEnded,
    DatabaseUnavailable,
    EnrollmentError,
    FieldViolation,
    InvalidField,
    RequestTimeout,
    RequestTooLarge,
)
from enrollment.server.operations import logs
from enrollment.server.operations.metrics import RpcMetrics
from enrollment.server.transport import error_status, watch
from enrollment.server.transport.auth import Authenticator, reads_only, required_role
from enrollment.server.transport.pool import WorkerPool
from enrollment.server.transport.wire import bad_utf8_field

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

log = logging.getLogger("enrollment.rpc")

SERVICE_PREFIX = "/enrollment.v1.EnrollmentService/"

# A caller's x-request-id is kept (and logged) only when it is short and plain;
# anything else is replaced by a fresh one, so logs cannot be forged through it.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class RpcInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        pool: WorkerPool,
        request_timeout: float,
        authenticator: Authenticator | None = None,
        metrics: RpcMetrics | None = None,
        on_loop: frozenset[str] = frozenset(),
        writer: WorkerPool | None = None,
        writes_on_loop: frozenset[str] = frozenset(),
        loop_turn: Turn | None = None,
        loop_reads: tuple[LoopDriver, Mapping[str, ReadSteps]] | None = None,
        max_calls: int | None = None,
        max_streams: int | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        """max_calls: calls other than streams served at once, max_streams: health Watch
        and reflection streams (CallSlots; WatchEvents are the hub's). on_loop:
        names of methods whose work runs on the event loop itself rather than
        in the pool (start-up chooses the cheap reads of a local SQLite file). writer: when
        given, the pool (of one thread, for SQLite) where every method that may write runs.
        writes_on_loop: methods of the writer's run on the loop when they can (LoopWrites),
        holding loop_turn. loop_reads: a driver of reads on the loop, and the methods it
        answers, by name, as steps (PostgreSQL's cheap reads). max_message_bytes: the
        largest request message taken (--max-message-bytes; see _tolerant)."""
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._on_loop = on_loop
        self._loop_reads = loop_reads
        self._loop_writes = None
        if loop_turn is not None:
            self._loop_writes = LoopWrites(
                loop_turn, metrics=metrics.sqlite_writes() if metrics is not None else None
            )
        self._writes_on_loop = writes_on_loop
        self._pool = pool
        self._writer = writer
        self._reads = RequestReads(request_timeout)
        self._slots = CallSlots(max_calls)
        self._streams = CallSlots(max_streams, "health Watch and reflection streams")
        self._max_message_bytes = max_message_bytes
        self._auth = authenticator
        self._metrics = metrics
        if authenticator is not None and metrics is not None:
            authenticator.on_failure = metrics.auth_failure

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.request_streaming:
            # Reflection: a token-free stream, counted apart from the calls.
            wrapped = _counted(handler, self._streams, self._max_message_bytes)
        elif method.startswith(SERVICE_PREFIX):
            name = method.rsplit("/", 1)[-1]
            writes = self._writer is not None and not reads_only(name)
            guard = _Guard(
                handler.unary_unary or handler.unary_stream,
                method,
                pool=self._writer if writes and self._writer is not None else self._pool,
                reads=self._reads,
                auth=self._auth,
                metrics=self._metrics,
                on_loop=name in self._on_loop,
                loop_first=self._loop_writes if name in self._writes_on_loop else None,
                loop_read=self._loop_read(name),
                slots=None if handler.unary_stream is not None else self._slots,
            )
            if handler.unary_unary is not None:
                served = {"unary_unary": None, "stream_unary": guard.serve}
            else:
                # WatchEvents: an async generator on the loop (it holds no pool thread).
                served = {"unary_stream": None, "stream_stream": guard.serve_stream}
            wrapped = handler._replace(
                request_streaming=True,
                request_deserializer=_tolerant(
                    handler.request_deserializer, self._max_message_bytes
                ),
                **served,
            )
        else:
            # Health Check and Watch: the same bound on the request's arrival; Watch, a
            # token-free stream, counted apart from the calls.
            slots = self._slots if handler.unary_unary is not None else self._streams
            wrapped = _bounded(handler, self._reads, slots, self._max_message_bytes)
        self._wrapped[method] = wrapped
        return wrapped

    def _loop_read(self, name: str) -> tuple[LoopDriver, ReadSteps] | None:
        if self._loop_reads is None:
            return None
        driver, reads = self._loop_reads
        read = reads.get(name)
        return None if read is None else (driver, read)


class _Refused:
    """Stands in for a request body the service does not take; error() says why."""

    def error(self) -> EnrollmentError:
        raise NotImplementedError


class _Undecodable(_Refused):
    """A request body that is not valid protobuf (say, a string not in UTF-8)."""

    def __init__(self, type_name: str, bad_field: str | None) -> None:
        self.type_name = type_name
        self.bad_field = bad_field  # the string field not in UTF-8, when that is the fault

    def error(self) -> InvalidField:
        text = f"the request is not a valid {self.type_name}"
        if self.bad_field is None:
            return InvalidField(f"{text} (is every string field UTF-8?)")
        violation = FieldViolation(self.bad_field, "is not valid UTF-8")
        return InvalidField(f"{text}: {self.bad_field} is not valid UTF-8", violations=(violation,))


class _TooLarge(_Refused):
    """A request message over --max-message-bytes (grpc's own limit is twice that)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit

    def error(self) -> RequestTooLarge:
        return RequestTooLarge.of(self.size, self.limit)


def _tolerant(deserialize, max_bytes: int | None):
    """deserialize, handing what the service does not take to the handler as a _Refused.

    grpc answers a body it cannot parse with a bare INTERNAL or UNKNOWN; it is the
    caller's mistake, and the handler answers INVALID_ARGUMENT. A message larger than
    grpc's limit grpc refuses itself, with a bare RESOURCE_EXHAUSTED, before any handler
    runs (the call's task is cancelled, as when its caller goes away): its limit is set
    at twice max_bytes (transport/options.py), so that a message a little too large is
    refused here, with its reason, its x-request-id and its true log line. data is the
    message as grpc decompressed it, so the limit is on the message, as grpc's is."""
    descriptor = deserialize.__self__.DESCRIPTOR
    limit = max_bytes if max_bytes is not None else 1 << 62

    def parse(data: bytes):
        if len(data) > limit:
            return _TooLarge(len(data), limit)
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable(descriptor.full_name, bad_utf8_field(descriptor, data))

    return parse


_CANCEL_GRACE = 0.05  # seconds


class RequestReads:
    """Reads each call's one request message on the event loop, ending a call whose
    message has not arrived within timeout seconds (RequestTimeout).

    asyncio.timeout() per call would arm and cancel a timer of the loop's own each time,
    several times the CPU of the rest of the read's bookkeeping (bench/PROFILE.md,
    "Figures behind code comments"). Every read waits the same timeout, so the reads in
    progress, kept in a dict in the order they began, are also in the order of their
    deadlines: one timer, set for the oldest read's deadline, ends whatever is due when
    it fires and is set again for the next oldest. A read that ends in time leaves the
    dict and costs no timer at all. Only on the event loop.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._reading: dict[asyncio.Task[Any], float] = {}  # task: its deadline (loop time)
        self._ended: set[asyncio.Task[Any]] = set()  # cancelled here, not by grpc
        self._timer: asyncio.TimerHandle | None = None

    async def read(self, context):
        """The call's request message, or RequestTimeout once timeout has passed."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs every handler as a task
        deadline = loop.time() + self.timeout
        self._reading[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._end_due, loop)
        try:
            request = await context.read()
        except asyncio.CancelledError:
            if task not in self._ended:
                raise  # grpc's: the caller went away, or the server is stopping
            self._ended.discard(task)
            task.uncancel()
            raise RequestTimeout.of(self.timeout) from None
        finally:
            self._reading.pop(task, None)
        if request is grpc.aio.EOF:
            # A call its caller cancelled reads EOF too, and grpc cancels its task a
            # moment later: wait that moment, so that it ends as CANCELLED, not as a
            # call that came without its message.
            await asyncio.sleep(_CANCEL_GRACE)
            raise InvalidField("the call carries no request message")
        return request

    def _end_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self._reading:
            task, deadline = next(iter(self._reading.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._end_due, loop)
                return
            del self._reading[task]
            self._ended.add(task)
            task.cancel()


class CallSlots:
    """Calls at once, counted by the server: --max-concurrent-rpcs for every call but the
    streams, --max-open-streams for health Watch and reflection streams.

    grpc's own limit (maximum_concurrent_rpcs) counts every call, so each open stream
    would hold one of its slots: as many watchers as the limit shut out every other
    call, health checks too, and health Watch and reflection streams need no token.
    WatchEvents streams are bounded by --max-watchers (transport/watch.py), the token-free
    streams and the other calls each by a CallSlots of their own; grpc's limit is set
    above the three together (startup/server.py). A call beyond its limit is answered
    RESOURCE_EXHAUSTED at once, as grpc answered it: no details, and nothing done. Only
    on the event loop (one counter, no lock)."""

    def __init__(self, limit: int | None, what: str = "calls") -> None:
        self.limit = limit if limit is not None else 1 << 62  # None: no bound of ours
        self.in_use = 0
        self.message = f"the server is serving its limit of {limit} {what} at once; retry later"

    async def refuse(self, context) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message)

    @contextlib.asynccontextmanager
    async def held(self, context):
        """One slot for the call while the block runs, or the call refused. (_Guard.serve,
        on every call's path, does the same inline: no context manager's coroutines.)"""
        if self.in_use >= self.limit:
            await self.refuse(context)
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


def _counted(handler: Any, slots: CallSlots, max_bytes: int | None) -> grpc.RpcMethodHandler:
    """A request-streaming handler (reflection: grpc's RpcMethodHandler namedtuple)
    holding one of slots while it runs; a request it does not take (_tolerant) ends the
    stream with its status."""
    behavior: Any = handler.stream_stream
    if behavior is None:  # no such method of ours: nothing to count
        return handler

    async def taken(request_iterator):
        async for request in request_iterator:
            yield _decoded(request)

    async def stream(request_iterator, context):
        async with slots.held(context):
            try:
                async for reply in behavior(taken(request_iterator), context):
                    yield reply
            except EnrollmentError as error:  # only _decoded's
                await _abort(context, error)

    return handler._replace(
        stream_stream=stream,
        request_deserializer=_tolerant(handler.request_deserializer, max_bytes),
    )


async def _abort(context, error: EnrollmentError):
    await context.abort_with_status(error_status.to_status(error))


def _bounded(
    handler: grpc.RpcMethodHandler, reads: RequestReads, slots: CallSlots, max_bytes: int | None
) -> grpc.RpcMethodHandler:
    """A unary-request handler of another service (health), run as request-streaming so
    that its request's arrival is bounded too, holding one of slots while it runs; a
    request it does not take (_tolerant) is answered with its status."""
    deserializer = _tolerant(handler.request_deserializer, max_bytes)

    async def request_of(context):
        try:
            return _decoded(await reads.read(context))
        except EnrollmentError as error:
            await _abort(context, error)

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request_iterator, context):
            async with slots.held(context):
                return await behavior(await request_of(context), context)

        return grpc.stream_unary_rpc_method_handler(
            unary, deserializer, handler.response_serializer
        )

    streaming = handler.unary_stream
    if streaming is None:  # not a unary-request handler: nothing to bound
        return handler

    async def stream(request_iterator, context):
        async with slots.held(context):
            # Either an async generator (the service writes as it goes) or a coroutine.
            replies: Any = streaming(await request_of(context), context)
            if hasattr(replies, "__aiter__"):
                async for reply in replies:
                    await context.write(reply)
            else:
                await replies

    return grpc.stream_stream_rpc_method_handler(stream, deserializer, handler.response_serializer)


class ReadSteps(Protocol):
    """A read as steps (persistence/steps.py), made of a request (servicer.ReadMethod)."""

    def steps(self, request: Any) -> Any: ...


class LoopDriver(Protocol):
    """Drives reads' steps on the event loop (persistence/loop_reads.py, LoopReads)."""

    async def run(self, steps_of: Callable[[], Any], is_active: Callable[[], bool]) -> Any: ...


class Group(Protocol):
    """Writes run together in one transaction (persistence's _Group)."""

    def run(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def intact(self) -> bool: ...


class Turn(Protocol):
    """The process's SQLite writer lock for a call on the loop (persistence's LoopTurn)."""

    async def __aenter__(self) -> None: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def run(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def together(self) -> contextlib.AbstractContextManager[Group]: ...


class _Queued:
    """A write waiting for its group."""

    __slots__ = ("call", "future", "request", "state", "work")

    def __init__(self, work: contextvars.Context, call: _Call, request, state: _CallState, future):
        self.work, self.call, self.request, self.state = work, call, request, state
        self.future: asyncio.Future[tuple[Any, Any] | None] = future


class _GroupLost(Exception):
    """The group's transaction is gone before its COMMIT (see _Group.intact)."""


class LoopWrites:
    """SQLite writes run on the event loop instead of the writer thread, when they can,
    and those that arrive together commit together.

    On SQLite a write handed to the writer thread costs the process far more CPU than
    the same write run on the loop (bench/PROFILE.md, "Figures behind code comments"):
    each of its statements gives up the GIL and takes it back while the loop thread
    wants it too. So a write of the methods start-up names (a few rows each) runs on the
    loop, as the cheap reads do.

    Group commit: a write queues, and the writes queued by the time the loop gets to
    them (those whose requests arrived in the same turn of the loop, or while the lock
    was held by another) run one after another in ONE transaction, each as a savepoint
    of it (one that fails rolls back alone), with one COMMIT and one fsync for all
    (`synchronous=FULL` still: no write is answered before the COMMIT that made it
    durable). Their answers, log lines and metrics all wait for that COMMIT; a COMMIT
    that fails fails every write of the group that had succeeded, with its status. At
    most MAX_GROUP writes a group, so the loop is held for a few writes at a time.

    Before the group is taken, the loop runs what else is due now (up to TURNS turns,
    while it has callbacks ready and the group is not full): under load those are other
    calls on their way here (a request being read, an interceptor), which then join
    this group instead of starting the next one. Each group costs a BEGIN, a COMMIT
    with its fsync, and its events' counter raise and INSERT; without this wait the
    groups at 64 writes in flight were small, and the write and mixed mixes cost more
    CPU a call (bench/PROFILE.md). An idle loop has nothing due: a lone write does not
    wait at all.

    The group waits for this process's writer lock as a coroutine (behind a batch in
    the writer thread, say), then runs holding it, without waiting for the file's lock:
    when another process holds that, BEGIN IMMEDIATE raises WouldWait before anything
    is done and every write of the group goes to the writer thread, which waits as
    before. The loop is held for the group's work and its COMMIT's fsync: when writes
    have made it wait longer than `budget` seconds each on average (a slow disk; one
    slow write among fast ones does not count for much), they go to the writer thread
    for `pause` seconds, then are tried here again. Only on the event loop.

    A write's wait is the time it held the loop less the loop thread's CPU over it
    (time.thread_time): the fsync, a read from disk, and what the machine's other
    processes took. Its CPU does not count, because the writer thread would not give
    that back: its Python holds the GIL, which the loop needs too, and there it costs
    more (above). Counting it sent a loaded 2-core VM's writes to the writer thread
    every few seconds, where each cost more CPU still (bench/PROFILE.md)."""

    BUDGET = 0.002
    PAUSE = 1.0
    WEIGHT = 0.1  # of the newest write in the average (an exponentially weighted one)
    CLIP = 4  # budgets, at most, that one write counts for in the average
    MAX_GROUP = 16
    TURNS = 64  # of the loop, at most, run before a group is taken

    def __init__(
        self,
        turn: Turn,
        budget: float = BUDGET,
        pause: float = PAUSE,
        metrics: tuple[Histogram, Counter] | None = None,
    ) -> None:
        """metrics: the groups' sizes and the pauses are counted there
        (RpcMetrics.sqlite_writes)."""
        self.turn = turn
        self.budget, self.pause = budget, pause
        self._sizes: Histogram | None = None
        self._pauses: Counter | None = None
        if metrics is not None:
            self._sizes, self._pauses = metrics
        self.average = 0.0  # seconds a write held the loop, lately (from none at all)
        self._resume = 0.0  # time.monotonic() from which writes run here again
        self._queue: list[_Queued] = []
        self._runner: asyncio.Task[None] | None = None

    async def run(self, work: contextvars.Context, call: _Call, request, state: _CallState):
        """(response, status) of call.run(request, state) run in work, on the loop, in
        a group: the call is finished (logged) by then. None when it would have waited
        for the file (nothing done, not finished) or writes are paused here."""
        if time.monotonic() < self._resume:
            return None
        loop = asyncio.get_running_loop()
        queued = _Queued(work, call, request, state, loop.create_future())
        self._queue.append(queued)
        if self._runner is None:
            self._runner = loop.create_task(self._drain())
        try:
            return await queued.future
        except asyncio.CancelledError:
            # The caller went away or the server is stopping. Still queued, the write
            # runs with its group, sees the call ended (no database work) and is
            # finished there; handed back (None), it is finished here.
            state.ended = True
            future = queued.future
            if future.done() and not future.cancelled() and future.result() is None:
                call.finish(state.why_ended(), "CALL_ENDED")
            raise

    async def _drain(self) -> None:
        group: list[_Queued] = []
        try:
            loop = asyncio.get_running_loop()
            # CPython's asyncio keeps the callbacks due this turn in `_ready`; a loop
            # without it (another implementation) takes the group at once, as before.
            due = getattr(loop, "_ready", None)
            for _ in range(self.TURNS):
                if not due or len(self._queue) >= self.MAX_GROUP:
                    break
                await asyncio.sleep(0)
            async with self.turn:
                group, self._queue = self._queue[: self.MAX_GROUP], self._queue[self.MAX_GROUP :]
                self._runner = None
                if self._queue:  # more than a group: the next waits for the lock again
                    self._runner = loop.create_task(self._drain())
                start, cpu = time.monotonic(), time.thread_time()
                try:
                    self._run(group)
                except Exception:
                    log.exception("a group of writes failed unexpectedly")
                    for queued in group:
                        if not queued.future.done():
                            _, status, code, reason = queued.call.failed(
                                error_status.INTERNAL_ERROR
                            )
                            queued.call.finish(code, reason)
                            queued.future.set_result((None, status))
                finally:
                    # Its wait: what a thread would have given back to the loop.
                    waited = (time.monotonic() - start) - (time.thread_time() - cpu)
                    self.held(waited / len(group), start)
                    if self._sizes is not None:
                        self._sizes.observe(len(group))
        except asyncio.CancelledError:
            if not group:
                # Cancelled while waiting for the lock (the server is stopping): the
                # writes queued go to the writer thread, as a write that would wait does.
                self._runner = None
                queued_now, self._queue = self._queue, []
                for queued in queued_now:
                    _settle(queued, None)
            raise

    def _run(self, group: list[_Queued]) -> None:
        if len(group) == 1:  # alone: its own transaction, without a savepoint in it
            queued = group[0]
            try:
                result = queued.work.run(
                    self.turn.run, queued.call.run, queued.request, queued.state
                )
            except WouldWait:
                result = None
            _settle(queued, result)
            return
        outcomes: list[tuple[Any, Any, str, str]] = []
        failure: EnrollmentError | None = None  # why the group did not commit
        try:
            with self.turn.together() as together:
                for queued in group:
                    outcome = queued.work.run(
                        together.run, queued.call.attempt, queued.request, queued.state
                    )
                    outcomes.append(outcome)
                    if not together.intact():
                        raise _GroupLost
        except WouldWait:
            for queued in group:
                _settle(queued, None)
            return
        except _GroupLost:
            # The last write's failure took the whole transaction (SQLite rolled it
            # back): the ones before it changed nothing after all, and may be tried
            # again; the ones after it were not run, and go to the writer thread.
            failure = DatabaseUnavailable.of()
        except EnrollmentError as error:  # the COMMIT failed
            failure = error
        except Exception:
            log.exception("a group of writes failed unexpectedly at its commit")
            failure = error_status.INTERNAL_ERROR
        for index, queued in enumerate(group):
            if index >= len(outcomes):
                _settle(queued, None)
                continue
            response, status, code, reason = outcomes[index]
            if status is None and failure is not None:
                # It had succeeded, and its group did not commit.
                response, status, code, reason = queued.call.failed(failure)
            queued.call.finish(code, reason)
            _settle(queued, (response, status))

    def held(self, seconds: float, now: float) -> None:
        """A write made the loop wait this long: pause here when they do so on average.
        One write counts for CLIP budgets at most, so a pause takes a few slow writes
        close together (a slow disk), not one fsync that took 25 ms on a loaded machine
        (seen under the mixed mix, where it sent a second of writes to the writer
        thread: bench/PROFILE.md)."""
        sample = min(seconds, self.CLIP * self.budget)
        average = self.average + self.WEIGHT * (sample - self.average)
        if average > self.budget:
            self._resume = now + seconds + self.pause
            if self._pauses is not None:
                self._pauses.inc()
            average = 0.0  # measured afresh once writes run here again
        self.average = average


def _settle(queued: _Queued, result: tuple[Any, Any] | None) -> None:
    future = queued.future
    if not future.done():
        future.set_result(result)
    elif result is None:
        # Its caller went away while it was queued, and it is not run here after all.
        queued.call.finish(queued.state.why_ended(), "CALL_ENDED")


_DEADLINE_SLACK = 0.05  # seconds


class _CallState:
    """Whether a call is still wanted, asked from the thread doing its database work:
    not once its deadline has passed, or once grpc has cancelled its coroutine (the
    client cancelled, or the server stopped after its grace period)."""

    __slots__ = ("deadline", "ended")

    def __init__(self, time_remaining: float | None) -> None:
        self.deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self.ended = False

    def is_active(self) -> bool:
        return not self.ended and (self.deadline is None or time.monotonic() < self.deadline)

    def why_ended(self) -> str:
        """Why a call that ended before its answer did (its status code name). A caller's
        deadline passes at the caller a moment before it does here (the caller counts
        from before its request left, and cancels the call itself): an end that close to
        the deadline is the deadline's."""
        near = self.deadline is not None and time.monotonic() >= self.deadline - _DEADLINE_SLACK
        return "DEADLINE_EXCEEDED" if near else "CANCELLED"

    def end(self) -> str:
        """grpc cancelled the call on the loop: ended, and why_ended()."""
        self.ended = True
        return self.why_ended()


class _Guard:
    """One EnrollmentService method: auth and the request on the loop, the work in a thread."""

    def __init__(
        self,
        behavior,
        method: str,
        *,
        pool: WorkerPool,
        reads: RequestReads,
        auth: Authenticator | None,
        metrics: RpcMetrics | None,
        on_loop: bool = False,
        loop_first: LoopWrites | None = None,
        loop_read: tuple[LoopDriver, ReadSteps] | None = None,
        slots: CallSlots | None = None,
    ) -> None:
        """slots: held by each call while it runs (WatchEvents: None, bounded apart)."""
        self._behavior = behavior
        self._slots = slots
        self._on_loop = on_loop
        self._loop_read = loop_read
        self._loop_first = loop_first
        self._name = method.rsplit("/", 1)[-1]
        self._needed = required_role(self._name)
        self._pool = pool
        self._reads = reads
        self._auth = auth
        self._metrics = metrics
        self._latency = metrics.latency(self._name) if metrics is not None else None
        # Decided once: a JSON log line takes the call's fields apart, a text line does not.
        self._log_fields = logs.structured()

    def _open(self, context) -> tuple[_Call, list[str]]:
        """What every call does first, unary or streaming: its request id (the caller's
        x-request-id when short and plain, else a fresh one) sent back as a trailer, its
        bookkeeping, and the authorization headers, read in the same pass."""
        start = time.perf_counter()
        request_id = None
        authorizations: list[str] = []
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, bytes):
                continue  # a -bin header: neither of these
            if key == "x-request-id":
                request_id = value
            elif key == "authorization":
                authorizations.append(value)
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = os.urandom(16).hex()  # uuid4().hex's form, without building a UUID
        call = _Call(self, context, start, request_id)
        context.set_trailing_metadata(call.trailer)
        if self._metrics is not None:
            self._metrics.in_flight.inc()
        return call, authorizations

    async def _request(self, call: _Call, authorizations: list[str], context):
        """The caller checked (without tokens configured, nothing to do), then the request.
        Authentication needs only the headers: a caller without a valid token is answered
        before its body is waited for."""
        if self._auth is not None:
            token = self._auth.authenticate_call(authorizations, call.peer)
            call.caller = token.name
            self._auth.authorize(token, self._name, self._needed)
        return await self._reads.read(context)

    async def serve(self, request_iterator, context: grpc.aio.ServicerContext):
        slots = self._slots
        assert slots is not None  # a unary method's guard has them
        if slots.in_use >= slots.limit:
            await self._refuse(slots, context)
        slots.in_use += 1
        try:
            call, authorizations = self._open(context)
            state = _CallState(context.time_remaining())
            try:
                request = await self._request(call, authorizations, context)
            except EnrollmentError as error:
                call.finish(error.code, error.reason)
                await context.abort_with_status(call.status_of(error))
            except asyncio.CancelledError:
                # The caller went away (or its deadline passed) before its request arrived.
                call.finish(state.end(), "CALL_ENDED")
                raise
            if self._loop_read is not None:
                response, status = await self._read_on_loop(self._loop_read, call, request, state)
            else:
                response, status = await self._work(call, request, state)
        finally:
            slots.in_use -= 1
        if status is not None:
            await context.abort_with_status(status)
        return response

    async def _refuse(self, slots: CallSlots, context) -> None:
        """A call beyond --max-concurrent-rpcs: refused at once, nothing done, yet a call
        like any other to the operator and its caller: its x-request-id sent back, its
        log line (reason MAX_CONCURRENT_RPCS, the flag to look at) and its count."""
        call, _ = self._open(context)
        call.finish("RESOURCE_EXHAUSTED", "MAX_CONCURRENT_RPCS")
        await slots.refuse(context)

    async def _work(self, call: _Call, request, state: _CallState) -> tuple[Any, Any]:
        """The call's service work on the loop (SQLite's cheap reads), as a loop write,
        or in the pool: (response, None) or (None, status)."""
        # The database work runs in the pool, in a copy of this context: the unit of work
        # asks callstate (bound here to this call's state) before it begins and commits.
        bound = callstate.bind(state.is_active)
        # And who made it, for the change feed's events (request_id, actor).
        who = callstate.bind_caller(call.request_id, call.caller if self._auth is not None else "")
        try:
            work = contextvars.copy_context()
        finally:
            callstate.unbind_caller(who)
            callstate.unbind(bound)
        if self._on_loop:
            # Less work than the hand-over to a pool thread and back (bench/PROFILE.md).
            return work.run(call.run, request, state)
        done = None
        if self._loop_first is not None:
            # Cancelled meanwhile, the call is finished there (LoopWrites.run).
            done = await self._loop_first.run(work, call, request, state)
        if done is None:
            done = await self._in_pool(work, call, request, state)
        return done

    async def _read_on_loop(
        self, loop_read: tuple[LoopDriver, ReadSteps], call: _Call, request, state: _CallState
    ) -> tuple[Any, Any]:
        """A read driven by the loop on the database's asynchronous connections
        (PostgreSQL's cheap reads; persistence/loop_reads.py)."""
        driver, read = loop_read
        try:
            try:
                steps = functools.partial(read.steps, _decoded(request))
                outcome = await driver.run(steps, state.is_active), None, "OK", ""
            except Exception as error:
                outcome = call.caught(error, state)
        except asyncio.CancelledError:
            # The caller cancelled, its deadline passed, or the server stopped after
            # its grace period: the statement's answer is thrown away when it comes.
            call.finish(state.end(), "CALL_ENDED")
            raise
        response, status, code, reason = outcome
        call.finish(code, reason)
        return response, status

    async def _in_pool(self, work: contextvars.Context, call: _Call, request, state: _CallState):
        try:
            return await self._pool.run(work.run, call.run, request, state)
        except asyncio.CancelledError:
            # The caller cancelled, its deadline passed, or the server stopped after its
            # grace period. The work is not abandoned half-way (queued, it still runs):
            # it sees the call ended, does no database work or rolls back, and writes
            # the call's log line itself.
            state.ended = True
            raise

    async def serve_stream(self, request_iterator, context: grpc.aio.ServicerContext):
        """A server-streaming method: the same opening as serve (request id, auth, the
        request within --request-timeout), then the servicer's async generator on the
        loop, each reply written as it comes; an EnrollmentError it raises ends the
        stream with its status. One log line when the stream ends."""
        call, authorizations = self._open(context)
        code, reason, status = "OK", "", None
        try:
            request = await self._request(call, authorizations, context)
            if isinstance(request, _Refused):
                raise request.error()
            async for reply in self._behavior(request, context):
                await context.write(reply)
        except EnrollmentError as error:
            _, status, code, reason = call.failed(error)
        except asyncio.CancelledError:
            code, reason = _stream_gone()  # the client went away: the usual end
            raise
        except _WRITE_REFUSED:
            # grpc failed a write it held for a client that then went away (it cancels
            # the task as well, a moment later): the same end, nothing to answer.
            code, reason = _stream_gone()
        except Exception:
            log.exception("rpc %s failed unexpectedly", self._name)
            _, status, code, reason = call.failed(error_status.INTERNAL_ERROR)
        finally:
            call.finish(code, reason)
        if status is not None:
            await context.abort_with_status(status)


# grpc.aio's error for a batch of operations core failed (the call was over): private
# to grpc, hence looked up, and nothing caught where a grpc has no such class.
_WRITE_REFUSED: Any = getattr(cygrpc, "ExecuteBatchError", ())


def _stream_gone() -> tuple[str, str]:
    """How a stream whose client went away is logged: CANCELLED CALL_ENDED, or, for one
    the hub had ended as too slow that never read up to its status, that reason."""
    if watch.ended_too_slow(asyncio.current_task()):
        return "RESOURCE_EXHAUSTED", "WATCHER_TOO_SLOW"
    return "CANCELLED", "CALL_ENDED"


def _decoded(request):
    """The request, or the error of a body the service does not take (_tolerant)."""
    if isinstance(request, _Refused):
        raise request.error()
    return request


class _Call:
    """One call's bookkeeping: its log line and metrics, written exactly once."""

    __slots__ = ("guard", "start", "request_id", "trailer", "caller", "peer")

    def __init__(self, guard: _Guard, context, start: float, request_id: str) -> None:
        self.guard = guard
        self.start = start
        self.request_id = request_id
        self.trailer = (("x-request-id", request_id),)
        self.caller = "-"
        self.peer = context.peer()

    def status_of(self, error: EnrollmentError) -> grpc.Status:
        """The status an error answers this call with, its x-request-id in the trailers."""
        status = error_status.INTERNAL if error is error_status.INTERNAL_ERROR else None
        return error_status.with_trailers(status or error_status.to_status(error), self.trailer)

    def failed(self, error: EnrollmentError) -> tuple[None, grpc.Status, str, str]:
        """attempt()'s outcome for a call that failed with error."""
        return None, self.status_of(error), error.code, error.reason

    def run(self, request, state: _CallState):
        """In a pool thread: the service call; returns (response, None) or (None, status)."""
        response, status, code, reason = self.attempt(request, state)
        self.finish(code, reason)
        return response, status

    def attempt(self, request, state: _CallState) -> tuple[Any, Any, str, str]:
        """The service call, not yet finished: (response, None, "OK", "") or (None,
        status, code, reason). WouldWait: nothing was done, it runs again elsewhere."""
        try:
            return self.guard._behavior(_decoded(request), None), None, "OK", ""
        except WouldWait:
            raise  # nothing was done: the call runs again in the writer thread
        except Exception as error:
            return self.caught(error, state)

    def caught(self, error: Exception, state: _CallState) -> tuple[Any, Any, str, str]:
        """attempt()'s outcome for the error its service call raised (in its except block)."""
        if isinstance(error, CallEnded):
            # Its deadline passed, or its caller cancelled: answered (and logged) as the
            # one it was. The caller's grpc may have answered it already; when not, as
            # when the deadline passed a moment before the caller's grpc noticed, the
            # caller reads this: DEADLINE_EXCEEDED, never a CANCELLED it did not ask for.
            ended = CallEnded.because(state.why_ended())
            return None, self.status_of(ended), ended.code, ended.reason
        if isinstance(error, EnrollmentError):
            return self.failed(error)
        log.exception("rpc %s failed unexpectedly", self.guard._name)
        return self.failed(error_status.INTERNAL_ERROR)

    def finish(self, code: str, reason: str) -> None:
        """Called once per call: on the loop when the call ends before its work is handed
        to the pool, otherwise by the pool thread when the work is over."""
        guard = self.guard
        elapsed = time.perf_counter() - self.start
        metrics, latency = guard._metrics, guard._latency
        if metrics is not None and latency is not None:
            metrics.in_flight.dec()
            latency.observe(elapsed)
            metrics.count(guard._name, code)
        if log.isEnabledFor(logging.INFO):
            self._log(code, reason or "-", round(elapsed * 1000, 2))

    def _log(self, code: str, reason: str, duration_ms: float) -> None:
        """The call's one log line."""
        method, peer, caller, request_id = self.guard._name, self.peer, self.caller, self.request_id
        fields = None
        if self.guard._log_fields:
            fields = {
                "rpc": {
                    "method": method,
                    "code": code,
                    "reason": reason,
                    "duration_ms": duration_ms,
                    "peer": peer,
                    "token": caller,
                    "request_id": request_id,
                }
            }
        logs.rpc(log, (method, code, reason, duration_ms, peer, caller, request_id), fields)
