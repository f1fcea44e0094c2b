"""Enqueue work for rows already committed to PostgreSQL, the source of truth."""
from __future__ import annotations

import contextlib
import logging
import threading
import uuid

from celery import Celery
from flask import current_app
from kombu import Producer

from common.queues import BROKER_ERRORS, TASK_ROUTES

log = logging.getLogger(__name__)


# The web's broker transport. kombu keeps reconnecting to a broker that is down for its whole connect timeout
# (6 s a message) even when told not to retry the publish, and without socket timeouts waits forever on one that
# hangs: a request thread tries twice, 0.1 s apart, 2 s each at most, and leaves the rest to the reconciler.
# (The workers keep Celery's patient defaults.)
FAIL_FAST = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.1, "socket_timeout": 2.0,
             "socket_connect_timeout": 2.0}


class Publisher:
    """Sends the web's task messages, each request thread through a producer (and broker connection) of its own.

    A message is built and sent by Celery's own two steps (`amqp.create_task_message`, `amqp.send_task_message`:
    the same message, headers and publish signals as `send_task`), without what `send_task` adds around them:
    a producer taken from and returned to the shared pool, the router, the task registry and an AsyncResult.
    Those were 43% of its CPU (300 against 172 us a message in a hot loop), and a lone client's `?wait` job waits
    for its message on the request's path. A thread's producer lives as long as the thread; one that failed is
    dropped, so the next message connects afresh."""

    def __init__(self, celery: Celery):
        self._celery = celery
        self._local = threading.local()

    def publish(self, task: str, *args: str, **kwargs) -> bool:
        """Enqueue a task for a row already committed; whether it was sent. If the broker is down the row stays
        queued and the reconciler enqueues it once Redis is back, so the client still gets its 202."""
        amqp, args_list = self._celery.amqp, list(args)
        # given argsrepr (ids need no saferepr) and no declare (the queues are bound by name on the default
        # exchange, so there is nothing to declare)
        message = amqp.create_task_message(str(uuid.uuid4()), task, args_list, kwargs, argsrepr=repr(args_list),
                                           kwargsrepr=repr(sorted(kwargs)))
        try:
            amqp.send_task_message(self._producer(), task, message, queue=TASK_ROUTES[task]["queue"], declare=[],
                                   retry=False)
            return True
        except BROKER_ERRORS as exc:
            self._drop_producer()
            log.warning("could not publish; the reconciler will enqueue it", extra={"task": task, "error": str(exc)})
            return False

    def _producer(self) -> Producer:
        if (producer := getattr(self._local, "producer", None)) is None:
            # connects on its first message, not here
            connection = self._celery.connection_for_write()
            producer = self._local.producer = self._celery.amqp.Producer(connection, auto_declare=False)
        return producer

    def _drop_producer(self) -> None:
        producer, self._local.producer = getattr(self._local, "producer", None), None
        if producer is not None:
            with contextlib.suppress(Exception):  # its connection is the one that failed
                producer.connection.release()


def publish(task: str, *args: str, **kwargs) -> bool:
    """Enqueue a task for a row already committed, through this app's Publisher; whether it was sent."""
    return current_app.extensions["publisher"].publish(task, *args, **kwargs)
