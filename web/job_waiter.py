"""Wake request threads when their job ends: each `?wait` request blocks on its own job's end in Redis.

A worker that records a job's end pushes it (the fields it just committed) onto the job's list, which
lives for JOB_DONE_TTL_SECONDS. A waiting request thread reads it with a blocking `BLMOVE` of the list
onto itself, which leaves the message for any other waiter of the same job; the message stays readable
after the job ends, so a waiter may start before or after that. No listener thread, no polling, and a
web process reads only the ends of the jobs it waits for.

It also tells the submit path whether a model's jobs may be queueing up (`may_be_queueing`), which decides
whether a job may rely on its model's waiting message: as this process sees it from its own waiting requests,
and, for the load other web processes bring, from the ends it hears of jobs recorded together.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import redis

from common.queues import RUN_PENDING_TTL_MS, job_done_key, read_job_done

log = logging.getLogger(__name__)

# A blocking read lasts at most this long, so a Redis that stops answering is noticed within the client's
# socket timeout; a read that returns empty-handed costs one round trip a second.
READ_SLICE_SECONDS = 1.0
# After Redis failed a read, the waiter reads the row and tries Redis again this much later.
RETRY_PAUSE_SECONDS = 0.5
# How long a message this process published counts as possibly still waiting when no request here hears its
# job's end (one submitted without ?wait, or whose wait ran out). Longer than a pending mark lives, so that a
# job left behind a marked message that was lost is claimed with the model's next job (common/queues.py).
UNHEARD_MESSAGE_SECONDS = 2 * RUN_PENDING_TTL_MS / 1000
# After hearing the end of a model's job that its worker recorded together with others (they had queued up),
# this process takes the model's jobs as queueing for this long: the submits of other web processes queue with
# its own, which its own waiting requests do not show. Under load such ends arrive every few milliseconds.
QUEUED_TOGETHER_SECONDS = 0.25


def _block_for(left: float) -> float:
    """A blocking read's timeout: at most a slice, and never 0 (which would block until the socket times out)."""
    return max(0.01, min(left, READ_SLICE_SECONDS))


class Watch:
    """One request's wait for one job's end."""

    def __init__(self, client: redis.Redis, job_id: str, on_end: Callable[[int], None]):
        self._client = client
        self._key = job_done_key(job_id)
        self._job_id = job_id
        self._on_end = on_end

    def wait(self, seconds: float, finished: Callable[[], bool]) -> dict | None:
        """The job's final fields once its end is announced; None when time is up, or when the announcement
        has no fields (a large result) or Redis was unreachable and `finished()` is true: the caller then has
        the row."""
        deadline, unreachable = time.monotonic() + seconds, False
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self._client.blmove(self._key, self._key, _block_for(left), "RIGHT", "LEFT")
            except redis.RedisError as exc:
                if not unreachable:  # once per outage of this wait, not once per retry
                    log.warning("could not read a job's end; reading its row", extra={"error": str(exc)})
                unreachable = True
                time.sleep(min(left, RETRY_PAUSE_SECONDS))
                if finished():  # the job may end while its announcement cannot be read
                    return self._ended(None)
                continue
            if message is not None:
                return self._ended(*self._read(message, finished))
            if unreachable:  # Redis is back: an end announced while it was away is lost, so read the row once more
                unreachable = False
                if finished():
                    return self._ended(None)
        return None

    def _read(self, message: bytes, finished: Callable[[], bool]) -> tuple[dict | None, int]:
        """The announced fields (None: the caller has read the row) and how many jobs were recorded together."""
        try:
            final, batch_size = read_job_done(message)
        except (ValueError, TypeError):  # not a message we can read: the row says how the job ended
            log.warning("unreadable job-done message", extra={"job_id": self._job_id})
            final, batch_size = None, 1
        if final is None:
            finished()
        return final, batch_size

    def _ended(self, final: dict | None, batch_size: int = 1) -> dict | None:
        self._on_end(batch_size)
        return final


class JobWaiter:
    def __init__(self, client: redis.Redis):
        self._client = client
        self._watched: dict[str, int] = {}  # job id -> requests of this process waiting for it
        # per model, the job of the last message this process published and when, until its end is heard
        self._last_sent: dict[str, tuple[str, float]] = {}
        self._model_of_sent: dict[str, str] = {}
        self._queued_together_until: dict[str, float] = {}  # per model (QUEUED_TOGETHER_SECONDS)
        self._lock = threading.Lock()

    def message_sent(self, model_id: str, job_id: str) -> None:
        """A message for the model's job was published from this process."""
        with self._lock:
            self._model_of_sent.pop(self._last_sent.get(model_id, ("",))[0], None)
            self._last_sent[model_id] = (job_id, time.monotonic())
            self._model_of_sent[job_id] = model_id

    def may_be_queueing(self, model_id: str, job_id: str) -> bool:
        """Whether jobs of the model may be queueing up, as this process sees it: another request here waits
        for its job, a job of the model was just heard to end recorded together with others, or the job of the
        last message this process published for the model has not been heard to end (for at most
        UNHEARD_MESSAGE_SECONDS when nobody here waits for it). A hint: either answer is safe, a wrong one
        costs only speed (web/api/jobs.py: _enqueue)."""
        with self._lock:
            if len(self._watched) > (job_id in self._watched) or self._queued_together(model_id):
                return True
            sent = self._last_sent.get(model_id)
            if sent is None:
                return False
            if sent[0] in self._watched or time.monotonic() - sent[1] < UNHEARD_MESSAGE_SECONDS:
                return True
            self._forget(sent[0])
            return False

    def _queued_together(self, model_id: str) -> bool:
        until = self._queued_together_until.get(model_id)
        if until is not None and until <= time.monotonic():
            del self._queued_together_until[model_id]
            return False
        return until is not None

    @contextmanager
    def watch(self, job_id: str, model_id: str) -> Iterator[Watch]:
        """A wait for the job (of the model) to end, counted (may_be_queueing) from now on."""
        with self._lock:
            self._watched[job_id] = self._watched.get(job_id, 0) + 1
        try:
            yield Watch(self._client, job_id, partial(self._heard_end, job_id, model_id))
        finally:
            with self._lock:
                if (left := self._watched.pop(job_id) - 1) > 0:
                    self._watched[job_id] = left

    def _heard_end(self, job_id: str, model_id: str, batch_size: int) -> None:
        with self._lock:
            self._forget(job_id)
            if batch_size > 1:
                self._queued_together_until[model_id] = time.monotonic() + QUEUED_TOGETHER_SECONDS

    def _forget(self, job_id: str) -> None:
        if (model_id := self._model_of_sent.pop(job_id, None)) is not None:
            del self._last_sent[model_id]
