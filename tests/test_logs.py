"""Server logging through a queue: the same lines as logging.basicConfig writes itself."""

from __future__ import annotations

import io
import logging

from server import logs

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def test_queued_lines_equal_direct_ones(monkeypatch):
    for name in ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    stream = io.StringIO()
    root.addHandler(logging.StreamHandler(stream))
    root.handlers[0].setFormatter(logging.Formatter(FORMAT))
    monkeypatch.setattr(logs.atexit, "register", lambda fn: stops.append(fn))
    stops: list = []

    logs.write_in_background()
    kept: list[logging.LogRecord] = []
    logger = logging.getLogger("enrollment.rpc.test")
    logger.setLevel(logging.INFO)
    keep = logging.Handler()
    keep.emit = kept.append
    logger.addHandler(keep)
    try:
        for n in range(3):
            logger.info("rpc method=%s code=%s n=%d", "GetStudent", "OK", n)
    finally:
        logger.removeHandler(keep)
        for stop in stops:
            stop()  # drains the queue
    reference = logging.Formatter(FORMAT)
    assert stream.getvalue().splitlines() == [reference.format(r) for r in kept]
    assert len(kept) == 3
