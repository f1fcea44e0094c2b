"""Wake request threads when their job ends: one Redis pattern subscription per web process.

A `?wait` request registers an event for its job id; a single listener thread turns each
"job done" message published by a worker into that event. No connection per request, no
polling of PostgreSQL: the handler reads the job again only when woken.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from common.queues import JOB_DONE_PATTERN

log = logging.getLogger(__name__)


class JobWaiter:
    def __init__(self, client: redis.Redis):
        self._client = client
        self._events: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def wait(self, job_id: str, seconds: float, finished: Callable[[], bool]) -> None:
        """Return when `finished()` is true (checked after each wake-up) or `seconds` have passed."""
        event = threading.Event()
        self._register(job_id, event)
        try:
            self._ensure_listening(timeout=min(seconds, 2.0))
            deadline = time.monotonic() + seconds
            while not finished() and (left := deadline - time.monotonic()) > 0:
                event.wait(left)
                event.clear()
        finally:
            self._unregister(job_id, event)

    def _register(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            self._events.setdefault(job_id, set()).add(event)

    def _unregister(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            waiting = self._events.get(job_id, set())
            waiting.discard(event)
            if not waiting:
                self._events.pop(job_id, None)

    def _ensure_listening(self, timeout: float) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen_forever, name="job-waiter", daemon=True)
                self._thread.start()
        self._subscribed.wait(timeout)

    def _wake(self, job_id: str | None = None) -> None:
        with self._lock:
            targets = self._events.get(job_id, set()) if job_id else set().union(*self._events.values())
            for event in targets:
                event.set()

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen()
            except redis.RedisError as exc:
                log.warning("job wake-up subscription lost; retrying", extra={"error": str(exc)})
            self._subscribed.clear()
            self._wake()  # messages may have been missed: every waiter re-reads its job
            time.sleep(1.0)

    def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.psubscribe(JOB_DONE_PATTERN)
            pubsub.get_message(timeout=5.0)  # the subscription's confirmation
            self._subscribed.set()
            self._wake()  # anything finished while we were connecting
            for message in pubsub.listen():
                if message["type"] == "pmessage":
                    self._wake(message["channel"].decode().rsplit(":", 1)[1])
        finally:
            pubsub.close()
