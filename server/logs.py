"""Logging set-up for the server process: records are written by one background thread."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import threading
import time


class _SecondCachedFormatter(logging.Formatter):
    """The same lines, with the date and time part of asctime computed once a second.

    Used by the one writing thread only, so the cache needs no lock.
    """

    _second = -1
    _prefix = ""

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._prefix = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._prefix, record.msecs)


class _HandOver(logging.handlers.QueueHandler):
    """Queues the record itself: the writing thread formats it, not the calling one.

    QueueHandler formats and copies each record first, for queues that cross processes
    or records whose arguments may change; here neither happens, so it is skipped.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_STOP = object()


def _write(records: queue.SimpleQueue, handlers: list[logging.Handler]) -> None:
    """Take every record queued so far and write each stream's lines with one write."""
    while True:
        batch = [records.get()]
        while True:
            try:
                batch.append(records.get_nowait())
            except queue.Empty:
                break
        stop = _STOP in batch
        batch = [r for r in batch if r is not _STOP]
        for handler in handlers:
            chosen = [r for r in batch if r.levelno >= handler.level and handler.filter(r)]
            if not chosen:
                continue
            if type(handler) is logging.StreamHandler:
                try:
                    text = "".join(handler.format(r) + handler.terminator for r in chosen)
                    with handler.lock:
                        handler.stream.write(text)
                        handler.flush()
                except Exception:
                    handler.handleError(chosen[0])
            else:
                for record in chosen:
                    handler.handle(record)
        if stop:
            return


def write_in_background() -> None:
    """Move the root logger's handlers behind a queue.

    The server logs one line per call. Written from the calling thread, each line is
    formatted and written with a write(2) under the handler's lock, and with many threads
    busy they queue on that lock and hand the GIL back and forth. Queued, a call only
    appends the record; one thread formats the lines and writes what has gathered at
    once. Lines keep their order and their time of creation.
    """
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not isinstance(h, logging.handlers.QueueHandler)]
    if not handlers:
        return
    for handler in handlers:
        if type(handler.formatter) is logging.Formatter and handler.formatter.datefmt is None:
            handler.setFormatter(_SecondCachedFormatter(handler.formatter._fmt))
    # The lines show none of these, and finding them costs each call a few microseconds
    # (logging's own advice for speed: https://docs.python.org/3/howto/logging.html).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    records: queue.SimpleQueue = queue.SimpleQueue()
    writer = threading.Thread(target=_write, args=(records, handlers), name="log", daemon=True)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(_HandOver(records))
    writer.start()

    def stop() -> None:
        # Lines still queued at exit are written before the process ends.
        records.put(_STOP)
        writer.join(5)

    atexit.register(stop)
