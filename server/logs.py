"""Process logging: readable text lines, or one JSON object per line (--log-format json),
written by one background thread."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import threading
import time

LOG_FORMATS = ("text", "json")
# The process id tells the workers of `serve --workers N` apart.
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a per-RPC record's fields (extra={"rpc": ...}) merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "rpc", None)
        if fields is not None:
            entry["message"] = "rpc"
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str, log_format: str = "text") -> None:
    """Configure the root logger once, at process start."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])


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
    # The process id stays: it tells the workers of `serve --workers N` apart.
    logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    handover = _HandOver(queue.SimpleQueue())
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(handover)
    writer = _start_writer(handover, handlers)

    def stop() -> None:
        # Lines still queued at exit are written before the process ends.
        handover.queue.put(_STOP)
        writer[0].join(5)

    def restart_in_child() -> None:
        # A forked worker has the queue but not the thread: give it both anew.
        handover.queue = queue.SimpleQueue()
        writer[0] = _start_writer(handover, handlers)[0]

    atexit.register(stop)
    os.register_at_fork(after_in_child=restart_in_child)


def _start_writer(handover: _HandOver, handlers: list[logging.Handler]) -> list[threading.Thread]:
    writer = threading.Thread(
        target=_write, args=(handover.queue, handlers), name="log", daemon=True
    )
    writer.start()
    return [writer]
