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


def setup(level: str, log_format: str = "text") -> None:
    """Configure the root logger once, at process start."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
