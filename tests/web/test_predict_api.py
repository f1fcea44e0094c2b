"""Submitting prediction jobs: input validation, idempotency, cancellation and waiting (no worker needed)."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import upload


def submit(client, headers, model, instances):
    return client.post(f"/api/v1/predict/{model}", headers=headers, json={"instances": instances})


@pytest.mark.parametrize("instances, message", [
    ([], "at least one row"),
    ([[1.0, 2.0]], "row 0: expected 4 features, got 2"),
    ([[1.0, 2.0, 3.0, 4.0], [1.0, "x", 3.0, 4.0]], "row 1, column 1: expected a finite number"),
    ([{"a": 1}], "trained without feature names"),
    ([5], "instances"),
])
def test_bad_instances_are_422_naming_the_row(client, user, iris_version, instances, message):
    response = submit(client, user["headers"], iris_version["id"], instances)
    assert response.status_code == 422, response.json
    assert message in response.json["error"]["message"]


def test_too_many_instances_and_archived_models_are_refused(client, user, settings, iris_version):
    rows = [[1.0, 2.0, 3.0, 4.0]] * (settings.max_instances_per_job + 1)
    assert submit(client, user["headers"], iris_version["id"], rows).status_code == 422
    client.delete(f"/api/v1/models/{iris_version['id']}", headers=user["headers"])
    archived = submit(client, user["headers"], iris_version["id"], rows[:1])
    assert archived.status_code == 409 and archived.json["error"]["code"] == "model_archived"


def test_idempotency_key_returns_the_same_job(client, user, iris_version):
    headers = {**user["headers"], "Idempotency-Key": uuid.uuid4().hex}
    first = submit(client, headers, iris_version["id"], [[5.0, 3.0, 1.5, 0.2]])
    second = submit(client, headers, iris_version["id"], [[5.0, 3.0, 1.5, 0.2]])
    assert first.json["id"] == second.json["id"]
    listed = client.get(f"/api/v1/jobs?model_id={iris_version['id']}", headers=user["headers"]).json
    assert listed["total"] == 1


def test_concurrent_submits_with_one_idempotency_key_create_one_job(app, user, iris_version):
    """Retries that race each other: each finds no job for the key yet, and the database lets one insert win."""
    headers = {**user["headers"], "Idempotency-Key": uuid.uuid4().hex}
    start = threading.Barrier(8)

    def submit_once(_):
        start.wait()
        return submit(app.test_client(), headers, iris_version["id"], [[5.0, 3.0, 1.5, 0.2]])

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(submit_once, range(8)))
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json["id"] for r in responses}) == 1
    listed = app.test_client().get(f"/api/v1/jobs?model_id={iris_version['id']}", headers=user["headers"]).json
    assert listed["total"] == 1


def test_cancel_a_queued_job(client, app, user, iris_version):
    celery = app.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)  # whatever workers run, none takes the job
    try:
        job = submit(client, user["headers"], iris_version["id"], [[5.0, 3.0, 1.5, 0.2]]).json
        assert job["status"] == "queued"
        response = client.delete(f"/api/v1/jobs/{job['id']}", headers=user["headers"])
    finally:
        celery.control.add_consumer("predictions", reply=True)
    assert response.status_code == 200 and response.json["status"] == "cancelled"
    again = client.delete(f"/api/v1/jobs/{job['id']}", headers=user["headers"])
    assert again.status_code == 409




def test_wait_answers_a_job_a_worker_finished_before_its_message_was_published(client, app, user, iris_version,
                                                                              monkeypatch):
    """Once a job's row is committed, a worker scoring queued jobs of its model together (adaptive batching)
    may claim, finish and announce it before the web has published the job's own message and begun to wait;
    `?wait` still answers as soon as it waits, not when the wait runs out."""
    from sqlalchemy import func, update

    from common.extensions import db
    from common.models import JobStatus, PredictionJob
    from common.queues import announce_job_done
    from web.api import jobs

    insert = jobs._insert_if_servable

    def inserted_then_finished_as_a_peer(*args, **kwargs):
        job = insert(*args, **kwargs)
        with db.engine.begin() as connection:  # what the peer's worker commits, then announces
            row = connection.execute(
                update(PredictionJob).where(PredictionJob.id == job.id)
                .values(status=JobStatus.succeeded, result={"predictions": [0]}, attempts=1, worker="peer:1",
                        started_at=func.clock_timestamp(), finished_at=func.clock_timestamp())
                .returning(*PredictionJob.__table__.c)).mappings().one()
        with app.extensions["redis"].pipeline() as pipe:
            announce_job_done(pipe, str(job.id), {**row, "status": JobStatus(row["status"]).value})
            pipe.execute()
        return job

    monkeypatch.setattr(jobs, "_insert_if_servable", inserted_then_finished_as_a_peer)
    started = time.monotonic()
    response = client.post(f"/api/v1/predict/{iris_version['id']}?wait=5", headers=user["headers"],
                           json={"instances": [[5.0, 3.0, 1.5, 0.2]]})
    assert response.status_code == 200 and response.json["status"] == "succeeded", response.json
    assert response.json["result"] == {"predictions": [0]} and response.json["worker"] == "peer:1"
    assert time.monotonic() - started < 2.5  # answered from the announcement, not at the 5 s deadline


def test_a_job_submitted_after_postgres_dropped_the_insert_connections_is_inserted_once(client, app, user,
                                                                                        iris_version):
    """The hot path's pool skips the pre-ping: a dropped connection fails the insert, which runs again on a
    fresh one (as after a PostgreSQL restart, when every pooled connection is gone)."""
    from sqlalchemy import text

    from common.extensions import DIRECT_SQL, db

    assert submit(client, user["headers"], iris_version["id"], [[5.0, 3.0, 1.5, 0.2]]).status_code == 202
    with app.app_context():
        pooled = [db.engines[DIRECT_SQL].raw_connection() for _ in range(3)]
        for connection in pooled:
            connection.close()  # back to the pool, open
    with app.app_context(), db.engine.connect() as admin:
        dropped = admin.execute(text("""
            SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE application_name = 'inferq-web-direct' AND datname = current_database()""")).scalar()
    assert dropped >= 3

    response = submit(client, user["headers"], iris_version["id"], [[6.0, 3.0, 4.5, 1.5]])
    assert response.status_code == 202, response.json
    listed = client.get(f"/api/v1/jobs?model_id={iris_version['id']}", headers=user["headers"]).json
    assert [job["id"] for job in listed["items"]].count(response.json["id"]) == 1


def test_a_value_postgres_cannot_store_is_422_and_no_job(client, user):
    """A string feature may hold a NUL (valid JSON), which a jsonb column refuses: the client's error, not ours."""
    import pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    frame = pd.DataFrame({"color": ["red", "blue", "red", "green"] * 5, "size": [1.0, 2.0, 3.0, 4.0] * 5})
    model = make_pipeline(make_column_transformer((OneHotEncoder(handle_unknown="ignore"), ["color"]),
                                                 remainder="passthrough"), LogisticRegression())
    version = upload(client, user["headers"], model.fit(frame, [0, 1, 0, 1] * 5), name="colors")

    response = submit(client, user["headers"], version["id"], [{"color": "re\u0000d", "size": 1.0}])
    assert response.status_code == 422, response.json
    assert response.json["error"]["code"] == "unstorable_value"
    listed = client.get(f"/api/v1/jobs?model_id={version['id']}", headers=user["headers"]).json
    assert listed["total"] == 0


def test_a_job_whose_row_is_deleted_during_a_wait_answers_404(client, app, user, iris_version):
    """A long poll whose job's row goes away meanwhile (its owner removed by an operator) answers 404 when the
    wait runs out, not a 500."""
    import threading

    from sqlalchemy import delete

    from common.extensions import db
    from common.models import PredictionJob

    celery = app.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)  # whatever workers run, none takes the job
    try:
        job = submit(client, user["headers"], iris_version["id"], [[5.0, 3.0, 1.5, 0.2]]).json
        assert job["status"] == "queued"

        def delete_row():
            with app.app_context(), db.engine.begin() as connection:
                connection.execute(delete(PredictionJob).where(PredictionJob.id == uuid.UUID(job["id"])))

        deleter = threading.Timer(0.3, delete_row)
        deleter.start()
        response = client.get(f"/api/v1/jobs/{job['id']}?wait=1", headers=user["headers"])
        deleter.join()
    finally:
        celery.control.add_consumer("predictions", reply=True)
    assert response.status_code == 404, response.json
    assert response.json["error"]["code"] == "not_found"
