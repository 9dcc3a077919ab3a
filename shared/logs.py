"""Log lines: human-readable text on a laptop, one JSON object per line in production (LOG_FORMAT).

A JSON line carries the time, level, logger and message, plus the worker id and the task id where
the code knows them: a worker binds its id in each of its threads (``bind_worker``), the sender binds
the task it is handling (``bind_task``). Both live in context variables, so one thread's task never
labels another thread's lines. Nothing else from a record is copied into the line: a library's
``extra=`` fields cannot carry a secret into it. The messages themselves hold no secret (the rule
every log call follows; tests/test_security.py greps a whole DEBUG run, in both formats).
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime

TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

_worker_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mailq_worker_id", default=None)
_task_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("mailq_task_id", default=None)


def bind_worker(worker_id: str | None) -> None:
    """Label this thread's lines with the worker's id (threads do not inherit context variables)."""
    _worker_id.set(worker_id)


def bind_task(task_id: int | None) -> None:
    """Label this thread's lines with the task it is handling; None when it is done with it."""
    _task_id.set(task_id)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, not more lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        worker = getattr(record, "worker_id", None) or _worker_id.get()
        task = getattr(record, "task_id", None) or _task_id.get()
        if worker:
            line["worker_id"] = str(worker)
        if task:
            line["task_id"] = int(task)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, fmt: str) -> None:
    """One format for the whole process (a no-op if logging is already configured)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == JSON else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
