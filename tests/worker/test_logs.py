"""Logs of a full flow through gunicorn and the workers: JSON lines with request ids, and no secret or payload."""
from __future__ import annotations

import json
import time
import uuid

import requests

from tests.conftest import model_file
from tests.live import live_server  # noqa: F401  (fixture)

# values no other test sends, so finding one in a log can only mean this test's payload leaked
PAYLOAD = [[5.123456789, 3.987654321, 1.456789123, 0.234567891]]


def worker_records(workers) -> list[dict]:
    """The JSON lines the test workers wrote (Celery prints a plain 'Warm shutdown' line when stopped)."""
    lines = [line for w in workers for line in w.log_path.read_text().splitlines()]
    return [json.loads(line) for line in lines if line.startswith("{")]


def worker_text(workers) -> str:
    return "\n".join(w.log_path.read_text() for w in workers)


def full_flow(base: str, iris) -> dict:
    """Register, sign in, refresh, create an API key, upload, predict twice (with and without X-Request-ID)."""
    email, password = f"flow-{uuid.uuid4().hex[:10]}@example.com", f"Pw{uuid.uuid4().hex}9"
    assert requests.post(f"{base}/auth/register", json={"email": email, "password": password}).status_code == 201
    assert requests.post(f"{base}/auth/login", json={"email": email, "password": "wrong" + password}).status_code == 401
    tokens = requests.post(f"{base}/auth/login", json={"email": email, "password": password}).json()
    rotated = requests.post(f"{base}/auth/refresh",
                            headers={"Authorization": f"Bearer {tokens['refresh_token']}"}).json()
    bearer = {"Authorization": f"Bearer {rotated['access_token']}"}
    user_id = requests.get(f"{base}/auth/me", headers=bearer).json()["id"]
    api_key = requests.post(f"{base}/auth/api-keys", headers=bearer, json={"name": "flow"}).json()["key"]
    data, filename = model_file(iris)
    model = requests.post(f"{base}/models/upload", headers={"X-API-Key": api_key},
                          files={"file": (filename, data)}, data={"name": "logged"}).json()
    sent_id = f"flow-{uuid.uuid4().hex}"
    tagged = requests.post(f"{base}/predict/{model['id']}?wait=20", json={"instances": PAYLOAD},
                           headers={"X-API-Key": api_key, "X-Request-ID": sent_id})
    untagged = requests.post(f"{base}/predict/{model['id']}?wait=20", json={"instances": PAYLOAD},
                             headers={"X-API-Key": api_key})
    assert tagged.status_code == untagged.status_code == 200, (tagged.text, untagged.text)
    requests.post(f"{base}/auth/logout", headers=bearer, json={"refresh_token": rotated["refresh_token"]})
    return {"user_id": user_id, "model_id": model["id"], "sent_id": sent_id, "tagged": tagged, "untagged": untagged,
            "secrets": [password, tokens["access_token"], tokens["refresh_token"], rotated["access_token"],
                        rotated["refresh_token"], api_key, api_key[12:]]}


def test_full_flow_logs_json_lines_with_request_ids_and_no_secrets(app, live_server, workers, iris_model):  # noqa: F811
    flow = full_flow(live_server.url + "/api/v1", iris_model[0])
    tagged, untagged = flow["tagged"], flow["untagged"]
    generated = untagged.headers["X-Request-ID"]
    assert tagged.headers["X-Request-ID"] == flow["sent_id"] and len(generated) == 32 and generated != flow["sent_id"]
    time.sleep(1)  # the task's last lines are written just after its result

    web = live_server.log_records()  # raises if any line is not one JSON object
    assert not [r for r in web if r["logger"].startswith("alembic.")], "start-up chatter in every web process"
    access = [r for r in web if r["message"] == "request" and r.get("route") == "/api/v1/predict/<string:model_ref>"]
    assert {(r["request_id"], r["user_id"], r["status"]) for r in access} >= {
        (flow["sent_id"], flow["user_id"], 200), (generated, flow["user_id"], 200)}
    submitted = {r["request_id"]: r for r in access}  # a submit's access line names its job
    assert submitted[flow["sent_id"]]["job_id"] == tagged.json()["id"]
    assert submitted[generated]["job_id"] == untagged.json()["id"]
    assert submitted[generated]["model_id"] == flow["model_id"]

    records = worker_records(workers)
    for job, request_id in ((tagged.json(), flow["sent_id"]), (untagged.json(), generated)):
        lines = [r for r in records if r.get("job_id") == job["id"]]
        assert any(r["message"] == "job finished" and r["status"] == "succeeded" for r in lines)
        # Celery's own "received" and "succeeded" lines for the task would only repeat it
        assert not [r for r in records if r["logger"].startswith("celery.") and job["id"] in json.dumps(r)]
        assert all(r["request_id"] == request_id and r["user_id"] == flow["user_id"]
                   and r["model_id"] == flow["model_id"] for r in lines)

    logs = live_server.log_path.read_text() + worker_text(workers)
    leaked = [s for s in flow["secrets"] if s in logs]
    assert not leaked, "a password, token or API key was logged"
    assert not [v for v in PAYLOAD[0] if str(v) in logs], "input values were logged"


def test_request_id_is_stored_with_the_job(app, client, user, workers, iris_model):
    from common.extensions import db
    from common.models import PredictionJob
    from tests.conftest import upload

    version = upload(client, user["headers"], iris_model[0], name="stored-id")
    for header, expect_sent in (({"X-Request-ID": "client-abc.123"}, True), ({}, False),
                                ({"X-Request-ID": "x" * 65}, False), ({"X-Request-ID": "bad id {\"x\": 1}"}, False)):
        response = client.post(f"/api/v1/predict/{version['id']}", headers={**user["headers"], **header},
                               json={"instances": [[5.0, 3.0, 1.5, 0.2]]})
        returned = response.headers["X-Request-ID"]
        assert (returned == header.get("X-Request-ID")) is expect_sent
        with app.app_context():
            assert db.session.get(PredictionJob, uuid.UUID(response.json["id"])).request_id == returned


def test_a_job_scored_with_another_jobs_message_is_logged_with_its_own_request_id(caplog):
    from types import SimpleNamespace

    from common.logging import log_context
    from common.models import JobStatus
    from worker.observability import job_finished

    peer = SimpleNamespace(id=uuid.uuid4(), model_version_id=uuid.uuid4(), queue_ms=5.0, attempts=1,
                           request_id="peer-submit")
    with caplog.at_level("INFO"), log_context(job_id=str(uuid.uuid4()), request_id="message-submit"):
        job_finished(peer, {"status": JobStatus.succeeded, "inference_ms": 1.0, "load_ms": 0.0, "cache_hit": True})
    record = [r for r in caplog.records if r.getMessage() == "job finished"][-1]
    assert (record.request_id, record.job_id) == ("peer-submit", str(peer.id))
