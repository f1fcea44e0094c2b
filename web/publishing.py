"""Enqueue work for rows already committed to PostgreSQL, the source of truth."""
from __future__ import annotations

import logging

from flask import current_app

from common.queues import BROKER_ERRORS

log = logging.getLogger(__name__)


def publish(task: str, *args: str) -> None:
    """Enqueue a task for a row already committed; if the broker is down the row stays queued and the
    reconciler enqueues it once Redis is back, so the client still gets its 202."""
    try:
        # given argsrepr (ids need no saferepr) and no declare (the queues are bound by name on the default
        # exchange, so there is nothing to declare): a fifth of send_task's CPU
        current_app.extensions["celery"].send_task(task, args=list(args), argsrepr=repr(list(args)), kwargsrepr="{}",
                                                   declare=[], retry=False)
    except BROKER_ERRORS as exc:
        log.warning("could not publish; the reconciler will enqueue it", extra={"task": task, "error": str(exc)})
