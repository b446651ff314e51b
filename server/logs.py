"""Logging set-up for the server process: records are written by one background thread."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue


def write_in_background() -> None:
    """Move the root logger's handlers behind a queue.

    The server logs one line per call. Written from the calling thread, each line is a
    write(2) under the handler's lock, and with many threads busy they queue on that lock
    and hand the GIL back and forth: at 16 concurrent calls that cost about as much CPU
    as the calls themselves. Queued, a call only appends the record; one thread formats
    and writes. Lines keep their order and their time of creation.
    """
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not isinstance(h, logging.handlers.QueueHandler)]
    if not handlers:
        return
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(records))
    listener.start()
    # Lines still queued at exit are written before the process ends.
    atexit.register(listener.stop)
