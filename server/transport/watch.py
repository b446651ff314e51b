"""WatchEvents for grpc.aio: every watcher of a process is fed by one poller task.

Built for the asyncio transport (the aio branch): a watcher is an async generator on
the event loop and holds no thread and no database connection while idle. One poller
task per process makes ONE query per wake-up for all watchers (events after the last
sequence it has seen, on the primary key: events.read_after) in the pool of database
threads, and hands each watcher the events that match its filters. It wakes

- at once after a commit in this process that wrote events (outbox.on_commit, called
  from the committing thread, hops onto the loop with call_soon_threadsafe), and
- at once after a commit of another server process on PostgreSQL (other --workers,
  other hosts): the process's one LISTENing connection (persistence/notify.py, started
  by startup/server.py, LISTENing while there are watchers: on_demand) calls wake();
  on SQLite and MariaDB within a few tens of milliseconds of it (notify.Looks asks the
  file's change counter or the feed's counter row while there are watchers), and
- every `interval` seconds otherwise (--watch-poll-interval), the fallback while the
  above fails.

Order and exactly-once come from the feed's guarantee (persistence/outbox.py): the
poller reads "after the last sequence I saw", and nothing at or below a seen sequence
appears later. A new watcher registers first (its queue then receives every event
after the poller's current head H), then reads its backlog through ListEvents' own
query up to at least H, then drains its queue; anything at or below the last sequence
it sent is skipped, so the hand-over neither loses nor repeats an event.

Memory is bounded: a watcher whose queue holds more than `max_queued` events is ended
with RESOURCE_EXHAUSTED WATCHER_TOO_SLOW (it resumes from the last sequence it got): its
queued events are dropped at once. A client that reads nothing at all holds its stream
behind a write that never completes, and grpc.aio gives a server no way to reset one
stream: cancelling the call's task frees nothing of grpc's (the call, its slot and its
buffered message stay until the client reads, cancels or loses its connection). So
such a stream stays counted: more than `max_watchers` streams open at once (an ended
one counts until grpc has ended its call: its client read the status or went away, or
--max-connection-age closed its connection) are refused with TOO_MANY_WATCHERS; stop()
ends every stream with UNAVAILABLE SHUTTING_DOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from enrollment.server.domain import events
from enrollment.server.domain.events import EventRecord
from enrollment.server.errors import (
    EnrollmentError,
    ShuttingDown,
    TooManyWatchers,
    WatcherTooSlow,
)
from enrollment.server.outage import Outage, database_words

log = logging.getLogger("enrollment.watch")

BATCH = 1000  # events per poll query and per backlog page
RETRY = 0.5  # seconds before the poller looks again after a failed look
RunInPool = Callable[..., Awaitable[Any]]


class _Watcher:
    __slots__ = ("course_id", "ended", "queue", "queued", "student_id", "task")

    def __init__(self, student_id: int, course_id: int) -> None:
        self.student_id, self.course_id = student_id, course_id
        # The task that iterates the stream: grpc's task for the call, which holds it to
        # its end. The stream counts as open (max_watchers) until that task is done.
        task = asyncio.current_task()
        if task is None:  # an async generator is only ever iterated by a task
            raise RuntimeError("WatchHub.watch is iterated outside an asyncio task")
        self.task: asyncio.Task[Any] = task
        self.ended: EnrollmentError | None = None  # why the hub ended it, once it has
        self.queue: asyncio.Queue[list[EventRecord] | EnrollmentError] = asyncio.Queue()
        self.queued = 0

    def wants(self, event: EventRecord) -> bool:
        return (not self.student_id or event.student_id == self.student_id) and (
            not self.course_id or event.course_id == self.course_id
        )


class WatchHub:
    def __init__(
        self,
        run_in_pool: RunInPool,
        *,
        max_watchers: int = 1000,
        max_queued: int = 10_000,
        interval: float = 0.25,
    ) -> None:
        self._run = run_in_pool
        self.max_watchers = max_watchers
        self.max_queued = max_queued
        self.interval = interval
        self._watchers: set[_Watcher] = set()  # those fed
        self._open = 0  # streams open, those ended and not yet gone too
        self._head = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._outage = Outage(log, "watch poller")  # the database away: logged once
        # Told True when the first watcher comes and False when the last goes: the
        # process listens or looks for other processes' commits only while it has
        # watchers (persistence/notify.py).
        self.on_demand: Callable[[bool], None] | None = None

    def _demand(self) -> None:
        if self.on_demand is not None:
            self.on_demand(bool(self._watchers))

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _, self._head = await self._run(events.read_after, 2**62, 1)
        events.on_commit(self.wake)
        self._task = asyncio.create_task(self._poll(), name="watch-poller")

    def wake(self) -> None:
        """From any thread: poll now (a local commit wrote events, or PostgreSQL
        notified one of another process's)."""
        if not self._watchers:
            # Nobody to feed: the poller would wake only to skip its query, and the hop
            # onto the loop (a task for its wait_for) cost every write CPU on the loop.
            # A watcher registering now reads the head after this commit (watch()).
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        """End every stream with UNAVAILABLE SHUTTING_DOWN, and the poller."""
        self._stopping = True
        events.remove_listener(self.wake)
        for watcher in list(self._watchers):
            self._end(watcher, ShuttingDown.of())
        self._wake.set()  # the poller sees _stopping at once, besides its cancellation
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # stop() itself was cancelled: not the poller's end to swallow

    def _end(self, watcher: _Watcher, error: EnrollmentError) -> None:
        watcher.ended = error
        self._watchers.discard(watcher)
        self._demand()
        watcher.queue.put_nowait(error)

    async def _poll(self) -> None:
        wait = self.interval
        while not self._stopping:
            # Not asyncio.wait_for: on Python 3.11 it returns a wait that ended in the
            # very turn the poller is cancelled and swallows the cancellation, so a
            # commit's wake-up with stop() left stop() waiting here forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            if self._stopping:
                return
            self._wake.clear()
            wait = self.interval
            if not self._watchers:
                continue  # nobody to feed: no query (the first watcher reads the head)
            try:
                while True:
                    found, _ = await self._run(events.read_after, self._head, BATCH)
                    if found:
                        self._deliver(found)
                        self._head = found[-1].sequence
                    if len(found) < BATCH:
                        break
            except EnrollmentError as exc:
                # The database is away. The wake-up that brought us here is spent, and
                # the next may be a long interval away: look again soon.
                self._outage.failed(database_words(exc))
                wait = min(self.interval, RETRY)
            except Exception:
                self._outage.failed("failed unexpectedly", unexpected=True)
                wait = min(self.interval, RETRY)
            else:
                self._outage.worked()

    def _deliver(self, found: list[EventRecord]) -> None:
        for watcher in list(self._watchers):
            matching = [e for e in found if watcher.wants(e)]
            if not matching:
                continue
            if watcher.queued + len(matching) > self.max_queued:
                self._too_slow(watcher)
                continue
            watcher.queued += len(matching)
            watcher.queue.put_nowait(matching)

    def _gone(self, _: object) -> None:
        self._open -= 1

    def _too_slow(self, watcher: _Watcher) -> None:
        # What it has not been sent is dropped: it resumes after the last event it got.
        while not watcher.queue.empty():
            watcher.queue.get_nowait()
        watcher.queued = 0
        self._end(watcher, WatcherTooSlow.of(0))
        _too_slow.add(watcher.task)

    def _check_room(self) -> None:
        if self._stopping:
            raise ShuttingDown.of()
        if self._open >= self.max_watchers:
            raise TooManyWatchers.of(self.max_watchers)

    async def watch(
        self, *, after_sequence: int, student_id: int, course_id: int
    ) -> AsyncIterator[list[EventRecord]]:
        """Lists of events, ascending, each event once: the backlog, then live ones."""
        self._check_room()
        if not self._watchers:
            # The poller reads nothing while nobody watches: catch its head up first,
            # so the first poll does not fetch everything written meanwhile.
            _, head = await self._run(events.read_after, 2**62, 1)
            if not self._watchers:
                self._head = max(self._head, head)
            # Others may have come in during that read: checked again, with no await
            # between the check and the registration below.
            self._check_room()
        watcher = _Watcher(student_id, course_id)
        self._watchers.add(watcher)  # first: from here on nothing after the head is missed
        # Open until its call's task is done: after this generator, the call may still
        # wait to send its status to a client that reads nothing.
        self._open += 1
        watcher.task.add_done_callback(self._gone)
        self._demand()
        registered_at = self._head
        last = after_sequence
        try:
            # The backlog through ListEvents' query (checks, filters, EVENTS_EXPIRED).
            while True:
                page = await self._run(_page, last, student_id, course_id)
                if page.events:
                    yield page.events
                    last = page.events[-1].sequence
                if watcher.ended is not None:  # stopping, or its queue overflowed meanwhile
                    raise _why(watcher.ended, last)
                if len(page.events) < BATCH and page.head_sequence >= registered_at:
                    last = max(last, min(page.head_sequence, registered_at))
                    break
            while True:
                item = await watcher.queue.get()
                if isinstance(item, EnrollmentError):
                    raise _why(item, last)
                watcher.queued -= len(item)
                fresh = [e for e in item if e.sequence > last]
                if fresh:
                    last = fresh[-1].sequence
                    yield fresh
        finally:
            self._watchers.discard(watcher)
            self._demand()


def _why(ended: EnrollmentError, last: int) -> EnrollmentError:
    """The error a stream ended by the hub raises, having sent up to sequence last."""
    return WatcherTooSlow.of(last) if isinstance(ended, WatcherTooSlow) else ended


# The tasks of streams ended too slow: one whose client never reads ends only when grpc
# cancels it (the client went away at last), and is logged WATCHER_TOO_SLOW all the same.
_too_slow: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def ended_too_slow(task: asyncio.Task[Any] | None) -> bool:
    """Whether the hub ended the stream that task serves as too slow."""
    return task is not None and task in _too_slow


def _page(after: int, student_id: int, course_id: int) -> events.EventPage:
    return events.list_events(
        after_sequence=after, page_size=BATCH, student_id=student_id, course_id=course_id
    )
