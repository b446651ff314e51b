"""The server's text log lines are logging's own, with the time part cached per second."""

from __future__ import annotations

import logging

from enrollment.server.operations import logs


def test_cached_time_lines_equal_logging_formatter_lines():
    cached = logs._SecondCachedFormatter(logs.TEXT_FORMAT)
    reference = logging.Formatter(logs.TEXT_FORMAT)
    logger = logging.getLogger("enrollment.rpc.test")
    lines = []
    for created in (1795792000.25, 1795792000.75, 1795792001.5, 1795792000.5, 1795795600.0):
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 1, "rpc method=%s n=%d", ("GetStudent", 1), None
        )
        record.created, record.msecs = created, (created - int(created)) * 1000
        lines.append((cached.format(record), reference.format(record)))
    for mine, theirs in lines:
        assert mine == theirs
    assert len({mine for mine, _ in lines}) == 5  # every second, and every millisecond, shows
