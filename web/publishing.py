"""Enqueue work for rows already committed to PostgreSQL, the source of truth."""
from __future__ import annotations

import logging

from flask import current_app

from common.queues import BROKER_ERRORS

log = logging.getLogger(__name__)


# The web's broker transport. kombu keeps reconnecting to a broker that is down for its whole connect timeout
# (6 s a message) even when told not to retry the publish, and without socket timeouts waits forever on one that
# hangs: a request thread tries twice, 0.1 s apart, 2 s each at most, and leaves the rest to the reconciler.
# (The workers keep Celery's patient defaults.)
FAIL_FAST = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.1, "socket_timeout": 2.0,
             "socket_connect_timeout": 2.0}


def publish(task: str, *args: str, **kwargs) -> bool:
    """Enqueue a task for a row already committed; whether it was sent. If the broker is down the row stays
    queued and the reconciler enqueues it once Redis is back, so the client still gets its 202."""
    try:
        # given argsrepr (ids need no saferepr) and no declare (the queues are bound by name on the default
        # exchange, so there is nothing to declare): a fifth of send_task's CPU
        current_app.extensions["celery"].send_task(task, args=list(args), kwargs=kwargs, argsrepr=repr(list(args)),
                                                   kwargsrepr=repr(sorted(kwargs)),
                                                   declare=[], retry=False)
        return True
    except BROKER_ERRORS as exc:
        log.warning("could not publish; the reconciler will enqueue it", extra={"task": task, "error": str(exc)})
        return False
