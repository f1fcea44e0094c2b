"""Submitting prediction jobs: input validation, idempotency and cancellation (no worker needed)."""
from __future__ import annotations

import uuid

import pytest

from tests.conftest import upload


def submit(client, headers, model, instances):
    return client.post(f"/api/v1/predict/{model}", headers=headers, json={"instances": instances})


@pytest.fixture
def iris_version(client, user, iris_model) -> dict:
    return upload(client, user["headers"], iris_model[0], name="iris")


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


