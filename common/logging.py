"""JSON log lines, one object per line, each carrying the request, user, job, batch and model it concerns.

The web and the workers both log through `configure_logging`. What a line is about comes from a
context (`log_context`) bound per request or per task; a filter copies it onto every record.
Nothing here logs request bodies, headers or arguments: callers pass ids, never payloads.
"""
from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("request_id", "user_id", "job_id", "batch_id", "model_id")
# Celery message header that carries the publisher's context to the task that runs it.
CONTEXT_HEADER = "inferq_log_context"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_context: ContextVar[dict[str, str]] = ContextVar("inferq_log_context", default={})


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is short and plain enough to store and log, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


def bind(**fields: object) -> Token:
    """Add fields (None values are skipped) to the current context; `reset` the token to undo."""
    extra = {k: str(v) for k, v in fields.items() if v is not None and k in CONTEXT_FIELDS}
    return _context.set({**_context.get(), **extra})


def reset(token: Token) -> None:
    _context.reset(token)


def current_context() -> dict[str, str]:
    return dict(_context.get())


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Every line logged inside the block carries `fields`."""
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


class ContextFilter(logging.Filter):
    """Copy the bound context onto each record, without overriding fields the call passed itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def json_formatter(service: str) -> JsonFormatter:
    """time, level, logger, message, service, plus every `extra=` field and the bound context."""
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}", style="{", datefmt="%Y-%m-%dT%H:%M:%S%z",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"service": service})


def configure_logging(level: str, service: str, filters: Iterable[logging.Filter] = ()) -> logging.Handler:
    """Send every log record of this process to stderr as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter(service))
    for extra_filter in (ContextFilter(), *filters):
        handler.addFilter(extra_filter)
    handler.inferq_json = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        # replace plain console handlers (and our own earlier one); keep test runners' capture handlers
        if type(old) is logging.StreamHandler or getattr(old, "inferq_json", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings become JSON records too, not raw stderr text
    return handler


def attach_context_to_message(headers: dict | None, **_kwargs: object) -> None:
    """Celery `before_task_publish` hook: the task's log lines carry the publisher's request id and user."""
    context = current_context()
    if headers is not None and context:
        headers.setdefault(CONTEXT_HEADER, context)
