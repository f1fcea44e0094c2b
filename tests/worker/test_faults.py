"""Faults lose nothing: killed workers, a flushed Redis, a model that crashes its worker, duplicate messages."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from sqlalchemy import func, select

from common.queues import RECONCILE_JOBS, RUN_PREDICTION
from tests.conftest import upload
from tests.worker.test_jobs import submit, wait_job

ROW = [[5.0, 3.0, 1.5, 0.2]]


def _running_child(workers, job_id: str, client, headers, timeout=20.0) -> int:
    """The pid of the worker child that holds `job_id`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json
        if job["status"] == "running" and job["worker"]:
            return int(job["worker"].rsplit(":", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started: {job}")


def test_worker_child_killed_mid_job_still_succeeds_exactly_once(client, user, workers, iris_model):
    version = upload(client, user["headers"], iris_model[0], name="fault-slow-2")
    job = submit(client, user["headers"], version["id"], ROW).json
    pid = _running_child(workers, job["id"], client, user["headers"])
    os.kill(pid, signal.SIGKILL)
    done = wait_job(client, user["headers"], job["id"], seconds=60)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert int(done["worker"].rsplit(":", 1)[1]) != pid
    assert done["result"]["predictions"] == iris_model[0].predict(ROW).tolist()


@pytest.mark.parametrize("rows_in_message", [False, True], ids=["job-id", "job-id-and-rows"])
def test_duplicate_message_writes_nothing_twice(client, app, user, workers, iris_model, rows_in_message):
    version = upload(client, user["headers"], iris_model[0], name=f"dup-{rows_in_message}")
    job = submit(client, user["headers"], version["id"], ROW, wait=20).json
    rows = {"instances": ROW, "model_version_id": version["id"]} if rows_in_message else {}
    app.extensions["celery"].send_task(RUN_PREDICTION, args=[job["id"]], kwargs=rows)
    time.sleep(2)
    again = client.get(f"/api/v1/jobs/{job['id']}", headers=user["headers"]).json
    assert again == job


def test_a_job_cancelled_before_its_message_with_rows_is_taken_stays_cancelled(client, app, user, workers,
                                                                                iris_model):
    version = upload(client, user["headers"], iris_model[0], name="cancelled-with-rows")
    celery = app.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)
    try:
        job = submit(client, user["headers"], version["id"], ROW).json
        cancelled = client.delete(f"/api/v1/jobs/{job['id']}", headers=user["headers"]).json
    finally:
        celery.control.add_consumer("predictions", reply=True)
    time.sleep(2)  # the message is taken, scored ahead of its claim, and its claim takes nothing
    again = client.get(f"/api/v1/jobs/{job['id']}", headers=user["headers"]).json
    assert again == cancelled and again["status"] == "cancelled" and again["attempts"] == 0


def test_flushed_redis_loses_no_queued_job(client, app, user, workers, iris_model, redis_conn):
    version = upload(client, user["headers"], iris_model[0], name="fault-slow-0.3")
    # pause consumption so the messages are still in Redis when it is flushed
    app.extensions["celery"].control.cancel_consumer("predictions", reply=True)
    try:
        jobs = [submit(client, user["headers"], version["id"], ROW).json["id"] for _ in range(6)]
        redis_conn.flushdb()
    finally:
        app.extensions["celery"].control.add_consumer("predictions", reply=True)
    time.sleep(4.5)  # past JOB_STUCK_SECONDS
    statuses = {client.get(f"/api/v1/jobs/{j}", headers=user["headers"]).json["status"] for j in jobs}
    assert statuses == {"queued"}  # their messages are gone with the flush
    app.extensions["celery"].send_task(RECONCILE_JOBS)
    finished = [wait_job(client, user["headers"], job_id, seconds=60) for job_id in jobs]
    assert [j["status"] for j in finished] == ["succeeded"] * 6


def test_model_that_kills_its_worker_fails_after_the_attempt_cap(client, user, workers, iris_model, settings):
    crasher = upload(client, user["headers"], iris_model[0], name="fault-crash")
    healthy = upload(client, user["headers"], iris_model[0], name="healthy")
    job = submit(client, user["headers"], crasher["id"], ROW).json
    done = wait_job(client, user["headers"], job["id"], seconds=120)
    assert done["status"] == "failed" and done["error"]["code"] == "attempts_exhausted"
    assert done["attempts"] == settings.job_max_attempts + 1  # the final claim only records the failure
    ok = submit(client, user["headers"], healthy["id"], ROW, wait=20).json
    assert ok["status"] == "succeeded"


def test_killed_worker_scoring_several_queued_jobs_together_loses_none(client, app, user, workers, iris_model):
    version = upload(client, user["headers"], iris_model[0], name="fault-slow-2-batched")
    celery = app.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)
    try:  # a backlog, so that one worker claims the jobs together
        ids = [submit(client, user["headers"], version["id"], ROW).json["id"] for _ in range(6)]
    finally:
        celery.control.add_consumer("predictions", reply=True)
    pid = _running_child(workers, ids[0], client, user["headers"])
    os.kill(pid, signal.SIGKILL)
    jobs = [wait_job(client, user["headers"], job_id, seconds=90) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 6
    assert all(int(j["worker"].rsplit(":", 1)[1]) != pid for j in jobs)
    assert all(j["result"]["predictions"] == iris_model[0].predict(ROW).tolist() for j in jobs)


def test_a_job_over_the_soft_time_limit_fails_with_a_reason_once(client, user, workers, iris_model, settings):
    """Both paths a job can take: one row (scored while its claim is in flight) and too many values for a message."""
    sleep = settings.job_soft_time_limit + 2  # past the soft limit, within the hard one
    assert sleep < settings.job_hard_time_limit
    version = upload(client, user["headers"], iris_model[0], name=f"fault-slow-{sleep}")
    one_row, many_rows = ROW, ROW * 300  # 1,200 values: more than a message carries
    ids = [submit(client, user["headers"], version["id"], rows).json["id"] for rows in (one_row, many_rows)]
    jobs = [wait_job(client, user["headers"], job_id, seconds=sleep + 30) for job_id in ids]
    for job in jobs:
        assert job["status"] == "failed" and job["attempts"] == 1 and job["result"] is None
        assert job["error"] == {"code": "time_limit",
                                "message": f"Prediction exceeded {settings.job_soft_time_limit}s"}
