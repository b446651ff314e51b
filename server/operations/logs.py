"""Process logging: readable text lines, or one JSON object per line (--log-format json)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

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


class _WithoutSqlValues(logging.Filter):
    """peewee logs each statement at DEBUG as (sql, bound values): the values are names
    and emails, so only the SQL is kept, with how many values were left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, tuple) and len(record.msg) == 2:
            sql, params = record.msg
            count = len(params) if isinstance(params, list | tuple | dict) else 0
            record.msg, record.args = "%s -- %d bound value(s) not logged", (sql, count)
        return True


_sql_filter = _WithoutSqlValues()


# Where grpc.aio logs the answers it could not send (grpc/_cython/_cygrpc/aio/server.pyx.pxi).
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"


class _AnswersToEndedCalls(logging.Filter):
    """grpc.aio logs an ERROR with a traceback when the status or response of a call
    cannot be sent because grpc's core has already ended the call: its deadline passed,
    or its caller went away, a moment before the answer was ready. That is the caller's
    doing, and the call's own line already says how it ended (DEADLINE_EXCEEDED or
    CANCELLED, CALL_ENDED): one INFO line without the traceback stands for it, so that
    alerts on ERROR lines are not set off by callers with short deadlines."""

    PREFIX = "ExecuteBatchError raised in core by servicer method ["

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR or not str(record.msg).startswith(self.PREFIX):
            return True
        method = record.getMessage().removeprefix(self.PREFIX).removesuffix("]")
        record.msg = "the answer to %s was not sent: grpc had ended the call (%s)"
        record.args = (method, "its deadline passed or its caller went away")
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


_ended_calls_filter = _AnswersToEndedCalls()
_structured = False
# The handler setup() made for text lines: while it is the only one a record of a
# logger would reach, that logger's per-call lines are written to it directly (rpc()).
_text_handler: logging.StreamHandler[Any] | None = None


def structured() -> bool:
    """Whether lines are JSON objects (--log-format json), the only format that reads a
    per-RPC record's fields: text lines need none, so a call builds none for them."""
    return _structured


def configured() -> bool:
    """Whether setup() has run in this process (the root logger has its handler)."""
    return bool(logging.getLogger().handlers)


def setup(level: str, log_format: str = "text", *, sql_values: bool = False) -> None:
    """Configure the root logger once, at process start.

    sql_values: let peewee's DEBUG lines show the values bound to each statement
    (--log-sql-values); by default they are left out, since they hold names and emails.

    Lines are written by the calling thread. A queue and one writing thread were tried
    (bench/PROFILE.md, "After the merge"): with four serving threads the hand-over cost
    more than the write.
    """
    global _structured, _text_handler
    _structured = log_format == "json"
    handler = logging.StreamHandler()
    text = _SecondCachedFormatter(TEXT_FORMAT)
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    _text_handler = None if _structured else handler
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger(GRPC_AIO_LOGGER).addFilter(_ended_calls_filter)
    statements = logging.getLogger("peewee")
    if sql_values:
        statements.removeFilter(_sql_filter)
    else:
        statements.addFilter(_sql_filter)
    # The lines show none of these, and finding them costs every call CPU (logging's
    # own advice for speed: https://docs.python.org/3/howto/logging.html).
    # The process id stays: it tells the workers of `serve --workers N` apart.
    # _srcfile is private, but the HOWTO names it and there is no public switch;
    # tests/test_private_internals.py fails when it stops working.
    logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None


# logging.Formatter.default_msec_format, which the class never changes.
_MSEC_FORMAT = logging.Formatter.default_msec_format or "%s,%03d"


class _SecondCachedFormatter(logging.Formatter):
    """The same lines, with the date and time part of asctime computed once a second."""

    def formatTime(  # noqa: N802 (logging's name)
        self, record: logging.LogRecord, datefmt: str | None = None
    ) -> str:
        if datefmt or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        return _MSEC_FORMAT % (_second(int(record.created)), record.msecs)


# The date and time part of asctime for one second: one (second, text) pair replaced
# whole, so threads need no lock.
_cached_second: tuple[int, str] = (-1, "")


def _second(second: int) -> str:
    global _cached_second
    cached, text = _cached_second
    if second != cached:
        text = time.strftime(logging.Formatter.default_time_format, time.localtime(second))
        _cached_second = (second, text)
    return text


# The one line of every call (transport/interceptors.py), without the time and level.
RPC_MESSAGE = "rpc method=%s code=%s reason=%s duration_ms=%.2f peer=%s token=%s request_id=%s"


def rpc(logger: logging.Logger, args: tuple[Any, ...], fields: dict[str, Any] | None) -> None:
    """Log a call's line at INFO (the caller has checked that INFO is enabled): args for
    RPC_MESSAGE, fields for a JSON line (extra=).

    logging's way costs about three times the rest of this: a LogRecord, the walk to the
    handlers, the handler's format(), each call (bench/PROFILE.md, "Figures behind code
    comments"). When a text line would reach only the handler setup() made, through no
    filter (_direct), the same line (tests/test_logs.py compares them) is written to that
    handler's stream under its lock, as its emit() would. Anything else that listens
    (a test's capture, a filter, another handler) gets logging's own way."""
    handler = _text_handler
    lock = None if handler is None else handler.lock
    if handler is None or lock is None or not _direct(logger, handler):
        logger.info(RPC_MESSAGE, *args, extra=fields)
        return
    now = time.time()
    line = "%s INFO [%d] %s %s%s" % (  # noqa: UP031 (the formatter's own %-format)
        _stamp(now),
        os.getpid(),
        logger.name,
        RPC_MESSAGE % args,
        handler.terminator,
    )
    try:
        with lock:
            stream = handler.stream
            stream.write(line)
            stream.flush()
    except Exception:  # as StreamHandler.emit: report it, never fail the call
        record = logger.makeRecord(
            logger.name, logging.INFO, "(direct)", 0, RPC_MESSAGE, args, None
        )
        handler.handleError(record)


def _direct(logger: logging.Logger, handler: logging.StreamHandler[Any]) -> bool:
    """Whether an INFO record of logger would reach handler alone, unfiltered, and be
    formatted as TEXT_FORMAT: no logger on its way to the root has a filter or a handler
    of its own, the root's only handler is this one, and nothing was changed in it."""
    if logger.disabled:
        return False
    node: logging.Logger | None = logger
    root = logging.root
    while node is not root:
        if node is None or node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    handlers = root.handlers
    return (
        len(handlers) == 1
        and handlers[0] is handler
        and not root.filters
        and not handler.filters
        and handler.level <= logging.INFO
        and type(handler.formatter) is _SecondCachedFormatter
        and handler.formatter._fmt == TEXT_FORMAT
        and handler.formatter.converter is time.localtime
        and logging.logProcesses
    )


def _stamp(created: float) -> str:
    """asctime as _SecondCachedFormatter writes it for a record created at `created`
    (LogRecord's msecs: the milliseconds, truncated)."""
    second = int(created)
    return _MSEC_FORMAT % (_second(second), int((created - second) * 1000))
