"""Prediction jobs end to end: the API, real Redis, real Celery worker processes, PostgreSQL."""
from __future__ import annotations

import base64
import json
import time
import uuid

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression, Ridge

from common.queues import JOB_DONE_MAX_BYTES, MESSAGE_ROWS_MAX_VALUES, RUN_PENDING_TTL_MS, mark_run_pending
from tests.conftest import upload


def wait_job(client, headers, job_id, seconds=30.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}?wait=5", headers=headers).json
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish in {seconds}s: {job}")


def submit(client, headers, model, instances, **kwargs):
    query = "?" + "&".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else ""
    return client.post(f"/api/v1/predict/{model}{query}", headers=headers, json={"instances": instances})


def test_submit_wait_returns_predictions_probabilities_and_timings(client, user, workers, iris_model, iris_version):
    model, X = iris_model
    response = submit(client, user["headers"], iris_version["id"], X[:3].tolist(), wait=20)
    assert response.status_code == 200, response.json
    job = response.json
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert job["result"]["predictions"] == model.predict(X[:3]).tolist()
    np.testing.assert_allclose(job["result"]["probabilities"], model.predict_proba(X[:3]), rtol=1e-6)
    assert job["result"]["classes"] == [0, 1, 2]
    assert set(job["timings"]) == {"queue_ms", "load_ms", "inference_ms", "total_ms"}
    assert job["timings"]["total_ms"] >= job["timings"]["queue_ms"] >= 0
    assert job["worker"] and job["started_at"] and job["finished_at"]


@pytest.mark.parametrize("rows", [1, 1000], ids=["announced-fields", "large-result-read-back"])
def test_wait_answers_exactly_what_a_later_poll_reads(client, user, workers, iris_model, iris_version, rows):
    """?wait answers from the worker's job-done message when it carries the fields, from PostgreSQL when the
    result is too large to announce; either way the answer is the committed row."""
    _, X = iris_model
    instances = np.resize(X, (rows, 4)).tolist()
    waited = submit(client, user["headers"], iris_version["id"], instances, wait=20)
    assert waited.status_code == 200 and waited.json["status"] == "succeeded", waited.json
    polled = client.get(waited.headers["Location"], headers=user["headers"])
    assert polled.json == waited.json
    assert len(waited.json["result"]["predictions"]) == rows
    assert (len(json.dumps(waited.json["result"])) > JOB_DONE_MAX_BYTES) == (rows > 1)


def test_wait_that_runs_out_answers_the_row_as_it_is_then(client, user, workers, iris_model):
    """A job still running when ?wait ends is 202 with its current state (running, attempt 1), not the state
    it was submitted in."""
    version = upload(client, user["headers"], iris_model[0], name="fault-slow-3")
    answer = submit(client, user["headers"], version["id"], [[5.0, 3.0, 1.5, 0.2]], wait=1.5)
    assert answer.status_code == 202
    assert answer.json["status"] == "running" and answer.json["attempts"] == 1 and answer.json["worker"]
    assert wait_job(client, user["headers"], answer.json["id"])["status"] == "succeeded"


def test_a_wait_that_loses_redis_answers_once_the_job_ends(settings, client, user, workers, iris_model):
    """The announcement is only a wake-up: a waiting request that can no longer reach Redis reads the job's row
    instead, and answers when the job ends, not when its wait runs out."""
    import threading
    from dataclasses import replace
    from urllib.parse import urlsplit

    from tests.tcp_proxy import CuttableProxy
    from web.app import create_app

    redis_at = urlsplit(settings.redis_url)
    version = upload(client, user["headers"], iris_model[0], name="fault-slow-2")
    with CuttableProxy((redis_at.hostname, redis_at.port or 6379)) as proxy:
        web = create_app(replace(settings, redis_url=f"redis://127.0.0.1:{proxy.port}{redis_at.path}")).test_client()
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(
            (submit(web, user["headers"], version["id"], [[5.0, 3.0, 1.5, 0.2]], wait=25), time.monotonic())))
        waiting.start()
        deadline = time.monotonic() + 15
        while not client.get(f"/api/v1/jobs?model_id={version['id']}&status=running",
                             headers=user["headers"]).json["items"]:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        cut_at = time.monotonic()  # the job is running (2 s) and its request waits on Redis through the proxy
        proxy.cut_off()
        waiting.join(30)
    (answer, answered_at), = answers
    assert answer.status_code == 200 and answer.json["status"] == "succeeded", answer.json
    assert answer.json["result"]["predictions"] == [0]
    assert answered_at - cut_at < 8  # the job's 2 s and a few retries, not the 25 s wait


def test_submit_without_wait_is_202_and_poll_finds_the_result(client, user, workers, iris_model, iris_version):
    response = submit(client, user["headers"], iris_version["id"], iris_model[1][:1].tolist())
    assert response.status_code == 202
    assert response.headers["Location"].endswith(response.json["id"]) and response.json["url"]
    assert wait_job(client, user["headers"], response.json["id"])["status"] == "succeeded"


def test_first_job_loads_the_model_and_the_next_hits_the_cache(client, user, workers, iris_model):
    version = upload(client, user["headers"], iris_model[0], name="cold-warm")
    # one worker child has to see both jobs for the second to be a hit: submit until a repeat
    jobs = [submit(client, user["headers"], version["id"], [[5.0, 3.0, 1.5, 0.2]], wait=20).json for _ in range(12)]
    first = jobs[0]
    assert first["cache_hit"] is False and first["timings"]["load_ms"] > 0
    hits = [j for j in jobs if j["cache_hit"]]
    assert hits and all(j["timings"]["load_ms"] == 0 for j in hits)
    by_worker = {}
    for job in jobs:
        by_worker.setdefault(job["worker"], []).append(job["cache_hit"])
    assert all(seen[0] is False and all(seen[1:]) for seen in by_worker.values())


def test_reference_resolution_pins_the_version(client, user, workers, iris_model):
    X, y = load_iris(return_X_y=True)
    v1 = upload(client, user["headers"], iris_model[0], name="pinned")
    v2 = upload(client, user["headers"], LogisticRegression(max_iter=500, C=0.01).fit(X, y), name="pinned")
    client.put("/api/v1/models/by-name/pinned/aliases/production", headers=user["headers"], json={"version": 1})
    job = submit(client, user["headers"], "pinned@production", X[:1].tolist()).json
    client.put("/api/v1/models/by-name/pinned/aliases/production", headers=user["headers"], json={"version": 2})
    assert job["model_id"] == v1["id"]
    assert wait_job(client, user["headers"], job["id"])["model_id"] == v1["id"]
    assert submit(client, user["headers"], "pinned@latest", X[:1].tolist()).json["model_id"] == v2["id"]
    assert submit(client, user["headers"], "pinned@v1", X[:1].tolist()).json["model_id"] == v1["id"]


def test_named_features_are_ordered_by_the_model(client, user, workers):
    import pandas as pd

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.drop(columns="target").iloc[:, :4]
    model = LogisticRegression(max_iter=2000).fit(frame, data.target)
    version = upload(client, user["headers"], model, name="named")
    row = frame.iloc[0].to_dict()
    shuffled = dict(reversed(list(row.items())))
    job = submit(client, user["headers"], version["id"], [shuffled], wait=20).json
    assert job["result"]["predictions"] == model.predict(pd.DataFrame([row])).tolist()


def test_other_users_jobs_and_models_are_not_found(client, user, other_user, workers, iris_version):
    job = submit(client, user["headers"], iris_version["id"], [[5.0, 3.0, 1.5, 0.2]], wait=20).json
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=other_user["headers"]).status_code == 404
    assert client.delete(f"/api/v1/jobs/{job['id']}", headers=other_user["headers"]).status_code == 404
    assert submit(client, other_user["headers"], iris_version["id"], [[1, 2, 3, 4]]).status_code == 404
    assert submit(client, other_user["headers"], "iris@latest", [[1, 2, 3, 4]]).status_code == 404
    assert client.get("/api/v1/jobs", headers=other_user["headers"]).json["total"] == 0


def test_prediction_error_fails_the_job_with_a_reason_not_a_traceback(client, user, workers):
    X, y = load_iris(return_X_y=True)
    version = upload(client, user["headers"], LogisticRegression(max_iter=500).fit(X, y), name="nan-intolerant")
    job = submit(client, user["headers"], version["id"], [[None, 1.0, 1.0, 1.0]], wait=20).json
    assert job["status"] == "failed"
    assert job["error"]["code"] == "prediction_error" and "NaN" in job["error"]["message"]
    assert "Traceback" not in job["error"]["message"]


def test_regressor_has_no_probabilities(client, user, workers):
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    model = Ridge().fit(X, y)
    version = upload(client, user["headers"], model, name="ridge")
    job = submit(client, user["headers"], version["id"], X[:2].tolist(), wait=20).json
    np.testing.assert_allclose(job["result"]["predictions"], model.predict(X[:2]))
    assert "probabilities" not in job["result"]


def _message_kwargs(redis_conn, job_id: str) -> dict:
    """The keyword arguments of the queued prediction message for the job."""
    for raw in redis_conn.lrange("predictions", 0, -1):
        args, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        if args[0] == job_id:
            return kwargs
    raise AssertionError(f"no queued message for job {job_id}")


def test_a_small_job_of_an_idle_model_brings_its_rows_to_its_worker(client, app, user, workers, iris_model):
    """Its worker scores them while its claim is in flight; a job over MESSAGE_ROWS_MAX_VALUES is read back."""
    model, X = iris_model
    small_model = upload(client, user["headers"], model, name="rows-in-message")
    large_model = upload(client, user["headers"], model, name="rows-read-back")
    large_rows = np.resize(X, (MESSAGE_ROWS_MAX_VALUES // 4 + 1, 4)).tolist()
    celery = app.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)
    try:
        small = submit(client, user["headers"], small_model["id"], X[:2].tolist()).json
        large = submit(client, user["headers"], large_model["id"], large_rows).json
        assert _message_kwargs(app.extensions["redis"], small["id"]) == {
            "instances": X[:2].tolist(), "model_version_id": small_model["id"]}
        assert _message_kwargs(app.extensions["redis"], large["id"]) == {}
    finally:
        celery.control.add_consumer("predictions", reply=True)
    for job, rows in ((small, X[:2]), (large, np.asarray(large_rows))):
        done = wait_job(client, user["headers"], job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 1 and done["worker"]
        assert done["result"]["predictions"] == model.predict(rows).tolist()
        np.testing.assert_allclose(done["result"]["probabilities"], model.predict_proba(rows), rtol=1e-6)
        assert done["timings"]["total_ms"] >= done["timings"]["queue_ms"] > 0 and not done["cache_hit"]


def test_queued_jobs_of_one_model_are_scored_together_each_with_its_own_result(client, app, user, workers,
                                                                               iris_model):
    model, X = iris_model
    version = upload(client, user["headers"], model, name="adaptive")
    celery = app.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)
    try:  # let a backlog build up, as when clients submit faster than workers score
        ids = [submit(client, user["headers"], version["id"], X[i:i + 1 + i % 2].tolist()).json["id"]
               for i in range(40)]
    finally:
        celery.control.add_consumer("predictions", reply=True)
    jobs = [wait_job(client, user["headers"], job_id) for job_id in ids]
    for i, job in enumerate(jobs):
        rows = X[i:i + 1 + i % 2]
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert job["result"]["predictions"] == model.predict(rows).tolist()
        np.testing.assert_allclose(job["result"]["probabilities"], model.predict_proba(rows), rtol=1e-6)
    scored_together = {}
    for job in jobs:  # jobs from one predict call share a worker and the call's inference time
        scored_together.setdefault((job["worker"], job["timings"]["inference_ms"]), []).append(job["id"])
    assert max(len(group) for group in scored_together.values()) > 1


def test_jobs_submitted_while_their_models_message_waits_share_it(user, iris_model, solo_worker):
    """One message serves a backlog of one model; a worker that claims a full batch sends the next message."""
    model, X = iris_model
    solo, _ = solo_worker(ADAPTIVE_BATCH_MAX_JOBS="4")
    version = upload(solo, user["headers"], model, name="shared-message")
    extensions = solo.application.extensions
    extensions["celery"].control.cancel_consumer("predictions", reply=True)
    try:
        ids = [submit(solo, user["headers"], version["id"], X[i:i + 1].tolist()).json["id"] for i in range(10)]
        # the first job's own message, then one for the jobs submitted while it waits
        assert extensions["redis"].llen("predictions") == 2
    finally:
        extensions["celery"].control.add_consumer("predictions", reply=True)
    jobs = [wait_job(solo, user["headers"], job_id) for job_id in ids]
    assert [(job["status"], job["attempts"]) for job in jobs] == [("succeeded", 1)] * 10
    assert [job["result"]["predictions"] for job in jobs] == [[p] for p in model.predict(X[:10]).tolist()]
    batches = {}
    for job in jobs:
        batches.setdefault(job["timings"]["inference_ms"], []).append(job["id"])
    # the first job alone (its rows came in its message), then the message the others relied on: its own job
    # and 3 peers, then two more messages, of 3 peers and of the last 2
    assert sorted(len(batch) for batch in batches.values()) == [1, 2, 3, 4]


def test_a_worker_without_batching_passes_a_shared_message_on(user, iris_model, solo_worker):
    """ADAPTIVE_BATCH_MAX_JOBS=1 on the worker but not in the web: jobs that skipped their own message are
    each scored alone, one message after another."""
    model, X = iris_model
    solo, _ = solo_worker(ADAPTIVE_BATCH_MAX_JOBS="1")
    version = upload(solo, user["headers"], model, name="no-batching")
    celery = solo.application.extensions["celery"]
    celery.control.cancel_consumer("predictions", reply=True)
    try:
        ids = [submit(solo, user["headers"], version["id"], X[i:i + 1].tolist()).json["id"] for i in range(4)]
        assert solo.application.extensions["redis"].llen("predictions") == 2
    finally:
        celery.control.add_consumer("predictions", reply=True)
    jobs = [wait_job(solo, user["headers"], job_id) for job_id in ids]
    assert [job["result"]["predictions"] for job in jobs] == [[p] for p in model.predict(X[:4]).tolist()]
    assert len({job["timings"]["inference_ms"] for job in jobs}) == 4  # four predict calls


def test_a_pending_mark_whose_message_was_lost_expires(user, iris_model, solo_worker):
    """Redis failing between marking a model's message pending and publishing it delays that model's jobs
    by at most RUN_PENDING_TTL_MS: the next submit after it publishes, and its worker claims both."""
    model, X = iris_model
    solo, _ = solo_worker()
    version = upload(solo, user["headers"], model, name="lost-message")
    # as if a message published from this web process for the model were waiting, marked, and then lost
    solo.application.extensions["job_waiter"].message_sent(version["id"], str(uuid.uuid4()))
    assert mark_run_pending(solo.application.extensions["redis"], version["id"])
    first = submit(solo, user["headers"], version["id"], X[:1].tolist(), wait=0.5).json
    assert first["status"] == "queued"
    time.sleep(RUN_PENDING_TTL_MS / 1000)
    second = submit(solo, user["headers"], version["id"], X[1:2].tolist(), wait=20).json
    assert second["status"] == "succeeded"
    assert wait_job(solo, user["headers"], first["id"], seconds=5)["result"]["predictions"] == [model.predict(X[:1])[0]]


def test_a_sixth_model_evicts_the_least_recently_used(client, user, iris_model, solo_worker):
    model, X = iris_model
    solo, _ = solo_worker(MODEL_CACHE_SIZE="5", MODEL_CACHE_BYTES=str(1 << 30))
    versions = [upload(solo, user["headers"], model, name=f"lru-{i}")["id"] for i in range(6)]

    def hit(version_id: str) -> bool:
        return submit(solo, user["headers"], version_id, X[:1].tolist(), wait=20).json["cache_hit"]

    assert [hit(v) for v in versions[:5]] == [False] * 5  # five models fill the cache
    assert hit(versions[0]) is True                       # model 0 is now the most recently used
    assert hit(versions[5]) is False                      # the sixth evicts model 1, the least recent
    assert hit(versions[0]) is True
    assert hit(versions[1]) is False
