"""Wake request threads when their job ends: one Redis pattern subscription per web process.

A `?wait` request watches its job id; a single listener thread hands each "job done" message published
by a worker to the watches of that job. The message carries the fields the worker just committed, so a
woken request answers without reading the row back; no connection per request, no polling.

Hearing every job's end, it also tells the submit path whether a model's jobs may be queueing up in this
process (`may_be_queueing`), which decides whether a job may rely on its model's waiting message.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from common.queues import JOB_DONE_PATTERN, read_job_done

log = logging.getLogger(__name__)


class Watch:
    """One request's interest in one job's end."""

    def __init__(self) -> None:
        self._woken = threading.Event()
        self.final: dict | None = None

    def wake(self, final: dict | None) -> None:
        if final is not None:
            self.final = final
        self._woken.set()

    def wait(self, seconds: float, finished: Callable[[], bool]) -> dict | None:
        """The job's final fields once its end is announced; None when time is up, or when a wake-up without
        fields (a lost subscription, a large result) finds `finished()` true: the caller then has the row."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self._woken.wait(left):
            self._woken.clear()
            if self.final is not None:
                return self.final
            if finished():
                return None
        return None


class JobWaiter:
    def __init__(self, client: redis.Redis):
        self._client = client
        self._watches: dict[str, set[Watch]] = {}
        # per model, the job of the last message this process published whose end it has not heard yet
        self._last_sent: dict[str, str] = {}
        self._model_of_sent: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def message_sent(self, model_id: str, job_id: str) -> None:
        """A message for the model's job was published from this process."""
        with self._lock:
            self._model_of_sent.pop(self._last_sent.get(model_id, ""), None)
            self._last_sent[model_id] = job_id
            self._model_of_sent[job_id] = model_id
        self._ensure_listening()

    def may_be_queueing(self, model_id: str, job_id: str) -> bool:
        """Whether jobs of the model may be queueing up, as this process sees it: another request here waits
        for its job, or the job of the last message this process published for the model has not ended.
        A hint (a missed announcement leaves it True until the model's next message): either answer is
        safe, a wrong one costs only speed (web/api/jobs.py: _enqueue)."""
        with self._lock:
            return model_id in self._last_sent or len(self._watches) > (job_id in self._watches)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """Watch a job's end from now on: enter before its message is published (or before reading its
        status), and no announcement can be missed."""
        watch = Watch()
        with self._lock:
            self._watches.setdefault(job_id, set()).add(watch)
        try:
            self._ensure_listening()  # no need to wait for it: on subscribing it wakes every watch
            yield watch
        finally:
            with self._lock:
                watches = self._watches.get(job_id, set())
                watches.discard(watch)
                if not watches:
                    self._watches.pop(job_id, None)

    def _ensure_listening(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen_forever, name="job-waiter", daemon=True)
                self._thread.start()

    def _wake(self, job_id: str | None = None, final: dict | None = None) -> None:
        with self._lock:
            targets = self._watches.get(job_id, set()) if job_id else set().union(*self._watches.values())
            for watch in targets:
                watch.wake(final)

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen()
            except redis.RedisError as exc:
                log.warning("job wake-up subscription lost; retrying", extra={"error": str(exc)})
            self._wake()  # messages may have been missed: every waiter re-reads its job
            time.sleep(1.0)

    def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.psubscribe(JOB_DONE_PATTERN)
            pubsub.get_message(timeout=5.0)  # the subscription's confirmation
            self._wake()  # anything finished while we were connecting
            for message in pubsub.listen():
                if message["type"] == "pmessage":
                    self._announce(message["channel"].decode().rsplit(":", 1)[1], message["data"])
        finally:
            pubsub.close()

    def _announce(self, job_id: str, data: bytes) -> None:
        with self._lock:
            if (model_id := self._model_of_sent.pop(job_id, None)) is not None:
                del self._last_sent[model_id]
            if job_id not in self._watches:  # every process hears every job; most are not waited for here
                return
        try:
            final = read_job_done(data)
        except (ValueError, TypeError):  # not a message we can read: the waiters read the row instead
            log.warning("unreadable job-done message", extra={"job_id": job_id})
            final = None
        self._wake(job_id, final)
