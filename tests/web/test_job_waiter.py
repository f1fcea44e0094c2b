"""The submit path's hint that a model's jobs may be queueing up (web/job_waiter.py), against the tests' Redis."""
from __future__ import annotations

import time
import uuid

from common.queues import JOB_DONE_FIELDS, announce_job_done, job_done_key
from web.job_waiter import QUEUED_TOGETHER_SECONDS, JobWaiter

ROW = {**dict.fromkeys(JOB_DONE_FIELDS), "status": "succeeded", "result": {"predictions": [1]}, "attempts": 1}


def _hear_end(waiter: JobWaiter, redis_conn, model_id: str, batch_size: int) -> None:
    """A request of this process waits for a job of the model, which its worker recorded with batch_size - 1
    others."""
    job_id = str(uuid.uuid4())
    with redis_conn.pipeline() as pipe:
        announce_job_done(pipe, job_id, ROW, batch_size)
        pipe.execute()
    try:
        with waiter.watch(job_id, model_id) as watch:
            assert watch.wait(5, lambda: False)["result"] == {"predictions": [1]}
    finally:
        redis_conn.delete(job_done_key(job_id))


def test_a_job_heard_recorded_with_others_shows_its_model_queueing_for_a_while(redis_conn):
    """Jobs queue up together across web processes; one process's own waiting requests show only its share."""
    waiter = JobWaiter(redis_conn)
    model_id, other_model_id, next_job = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    assert not waiter.may_be_queueing(model_id, next_job)
    _hear_end(waiter, redis_conn, model_id, batch_size=1)
    assert not waiter.may_be_queueing(model_id, next_job)  # scored alone: nothing had queued up
    _hear_end(waiter, redis_conn, model_id, batch_size=3)
    assert waiter.may_be_queueing(model_id, next_job)
    assert not waiter.may_be_queueing(other_model_id, next_job)
    time.sleep(QUEUED_TOGETHER_SECONDS)
    assert not waiter.may_be_queueing(model_id, next_job)
