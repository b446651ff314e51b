"""Process logging: readable text lines, or one JSON object per line (--log-format json)."""

from __future__ import annotations

import json
import logging
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
_structured = False


def structured() -> bool:
    """Whether lines are JSON objects (--log-format json), the only format that reads a
    per-RPC record's fields: text lines need none, so a call builds none for them."""
    return _structured


def setup(level: str, log_format: str = "text", *, sql_values: bool = False) -> None:
    """Configure the root logger once, at process start.

    sql_values: let peewee's DEBUG lines show the values bound to each statement
    (--log-sql-values); by default they are left out, since they hold names and emails.

    Lines are written by the calling thread. A queue and one writing thread were tried
    (bench/PROFILE.md, "After the merge"): with four serving threads the hand-over cost
    more than the write.
    """
    global _structured
    _structured = log_format == "json"
    handler = logging.StreamHandler()
    text = _SecondCachedFormatter(TEXT_FORMAT)
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    logging.basicConfig(level=level, handlers=[handler])
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


class _SecondCachedFormatter(logging.Formatter):
    """The same lines, with the date and time part of asctime computed once a second.

    The cache is one (second, text) pair replaced whole, so threads need no lock.
    """

    _cache: tuple[int, str] = (-1, "")

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached_second, prefix = self._cache
        if second != cached_second:
            prefix = time.strftime(self.default_time_format, self.converter(second))
            self._cache = (second, prefix)
        return self.default_msec_format % (prefix, record.msecs)
