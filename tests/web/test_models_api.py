"""The model registry through the API: upload, versions, listing, changes, aliases, ownership, bad files."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from tests.conftest import model_file, upload


class Shell:
    """A pickle whose loading would run a shell command."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def post_file(client, headers, data: bytes, filename: str, name: str = "m"):
    return client.post("/api/v1/models/upload", headers=headers, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(data), filename), "name": name})


def test_upload_records_metadata_and_hashes(client, user, iris_model):
    data, filename = model_file(iris_model[0], "joblib")
    raw = data.getvalue()
    response = post_file(client, user["headers"], raw, filename, name="iris")
    assert response.status_code == 201
    model = response.json
    assert (model["name"], model["version"], model["reference"]) == ("iris", 1, "iris@v1")
    assert model["estimator_class"] == "sklearn.linear_model.LogisticRegression"
    assert (model["task_kind"], model["n_features_in"], model["classes"]) == ("classifier", 4, [0, 1, 2])
    assert model["has_predict_proba"] and model["upload_format"] == "joblib"
    assert model["upload_sha256"] == hashlib.sha256(raw).hexdigest() and model["upload_size"] == len(raw)
    assert model["artifact_sha256"] != model["upload_sha256"] and model["artifact_size"] > 0


def test_concurrent_uploads_of_one_name_get_consecutive_versions(app, user, iris_model):
    data, filename = model_file(iris_model[0], "skops")
    raw = data.getvalue()

    def one(_):
        return post_file(app.test_client(), user["headers"], raw, filename, name="raced")

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, range(4)))
    assert [r.status_code for r in responses] == [201] * 4
    assert sorted(r.json["version"] for r in responses) == [1, 2, 3, 4]


def test_malicious_pickle_is_refused_runs_nothing_and_stores_nothing(client, user, settings, tmp_path):
    canary = tmp_path / "canary"
    response = post_file(client, user["headers"], pickle.dumps(Shell(str(canary))), "evil.pkl", name="evil")
    assert response.status_code == 422 and response.json["error"]["code"] == "invalid_model"
    assert "system" in response.json["error"]["message"]
    assert not canary.exists()
    assert client.get("/api/v1/models?name=evil", headers=user["headers"]).json["total"] == 0
    incoming = os.path.join(settings.storage_root, ".incoming")
    assert not os.path.isdir(incoming) or os.listdir(incoming) == []


@pytest.mark.parametrize("data, filename, fragment", [
    (b"", "m.joblib", "empty"),
    (b"\x80\x04garbage", "m.pkl", "Model rejected"),
    (b"hello", "m.txt", "Unsupported model file .txt"),
])
def test_bad_files_are_422_with_a_reason(client, user, data, filename, fragment):
    response = post_file(client, user["headers"], data, filename)
    assert response.status_code == 422 and fragment in response.json["error"]["message"]


def test_bad_names_and_oversize_files_are_refused(client, user, iris_model, settings, database, redis_conn):
    from dataclasses import replace

    from web.app import create_app

    data, filename = model_file(iris_model[0], "skops")
    for bad in ("../etc", ".hidden", "a b", "x" * 101):
        assert post_file(client, user["headers"], data.getvalue(), filename, name=bad).status_code == 422
    small = create_app(replace(settings, max_model_bytes=1000)).test_client()
    assert post_file(small, user["headers"], data.getvalue(), filename).status_code == 413


def test_list_filters_paginates_newest_first(client, user, iris_model):
    for name in ("a", "b", "a"):
        upload(client, user["headers"], iris_model[0], name=name)
    page = client.get("/api/v1/models?per_page=2", headers=user["headers"]).json
    assert page["total"] == 3 and len(page["items"]) == 2
    assert [m["reference"] for m in page["items"]] == ["a@v2", "b@v1"]
    assert client.get("/api/v1/models?name=a", headers=user["headers"]).json["total"] == 2
    assert client.get("/api/v1/models?per_page=1000", headers=user["headers"]).status_code == 422


def test_patch_and_archive_and_archived_is_final(client, user, iris_model):
    model = upload(client, user["headers"], iris_model[0], name="p")
    url = f"/api/v1/models/{model['id']}"
    changed = client.patch(url, headers=user["headers"], json={"description": "v2", "tags": ["prod"],
                                                               "status": "deprecated"})
    assert changed.status_code == 200 and (changed.json["description"], changed.json["tags"],
                                           changed.json["status"]) == ("v2", ["prod"], "deprecated")
    assert client.patch(url, headers=user["headers"], json={"id": "x"}).status_code == 422
    assert client.delete(url, headers=user["headers"]).status_code == 204
    assert client.get(url, headers=user["headers"]).json["status"] == "archived"
    assert client.patch(url, headers=user["headers"], json={"status": "active"}).status_code == 409


def test_aliases_point_move_resolve_and_go(client, user, iris_model):
    X, y = load_iris(return_X_y=True)
    v1 = upload(client, user["headers"], iris_model[0], name="al")
    v2 = upload(client, user["headers"], LogisticRegression(max_iter=300, C=0.1).fit(X, y), name="al")
    base = "/api/v1/models/by-name/al/aliases"
    assert client.put(f"{base}/production", headers=user["headers"], json={"version": 1}).json["model_id"] == v1["id"]
    assert client.put(f"{base}/production", headers=user["headers"], json={"version": 2}).json["model_id"] == v2["id"]
    assert [a["alias"] for a in client.get(base, headers=user["headers"]).json] == ["production"]
    assert client.put(f"{base}/latest", headers=user["headers"], json={"version": 1}).status_code == 422
    assert client.put(f"{base}/staging", headers=user["headers"], json={"version": 9}).status_code == 404
    assert client.delete(f"{base}/production", headers=user["headers"]).status_code == 204
    assert client.delete(f"{base}/production", headers=user["headers"]).status_code == 404


def test_another_users_models_and_aliases_are_not_found(client, user, other_user, iris_model):
    model = upload(client, user["headers"], iris_model[0], name="mine")
    client.put("/api/v1/models/by-name/mine/aliases/prod", headers=user["headers"], json={"version": 1})
    headers = other_user["headers"]
    assert client.get(f"/api/v1/models/{model['id']}", headers=headers).status_code == 404
    assert client.patch(f"/api/v1/models/{model['id']}", headers=headers, json={"description": "x"}).status_code == 404
    assert client.delete(f"/api/v1/models/{model['id']}", headers=headers).status_code == 404
    assert client.put("/api/v1/models/by-name/mine/aliases/prod", headers=headers, json={"version": 1}).status_code == 404
    assert client.delete("/api/v1/models/by-name/mine/aliases/prod", headers=headers).status_code == 404
    assert client.get("/api/v1/models", headers=headers).json["total"] == 0
