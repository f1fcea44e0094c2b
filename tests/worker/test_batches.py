"""Batch scoring end to end, on real worker processes: formats, order, options, bad rows, faults."""
from __future__ import annotations

import io
import os
import signal
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression

from tests.conftest import upload

N_FEATURES = 5


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(2000, N_FEATURES))
    y = np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(N_FEATURES)])
    return LogisticRegression().fit(frame, y)


@pytest.fixture
def model_version(client, user, trained) -> dict:
    return upload(client, user["headers"], trained, name="batch-model")


def frame_of(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, N_FEATURES)), columns=[f"f{i}" for i in range(N_FEATURES)])
    frame.insert(0, "row_id", [f"r{i:07d}" for i in range(rows)])
    return frame


def encode(frame: pd.DataFrame, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buffer, index=False)
    elif fmt == "jsonl":
        frame.to_json(buffer, orient="records", lines=True)
    else:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    return buffer.getvalue()


def submit(client, headers, model, data: bytes, filename: str, **options):
    form = {"file": (io.BytesIO(data), filename), "model": model, **{k: str(v).lower() for k, v in options.items()}}
    return client.post("/api/v1/batches", headers=headers, data=form, content_type="multipart/form-data")


def wait_batch(client, headers, batch_id: str, seconds: float = 120) -> dict:
    deadline, seen = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        batch = client.get(f"/api/v1/batches/{batch_id}", headers=headers).json
        seen.append(batch["rows_done"])
        if batch["status"] in ("succeeded", "failed", "cancelled"):
            assert seen == sorted(seen), "progress went backwards"
            assert batch["percent"] <= 100
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


def download(client, headers, batch_id: str, fmt: str) -> pd.DataFrame:
    response = client.get(f"/api/v1/batches/{batch_id}/result?format={fmt}", headers=headers)
    assert response.status_code == 200, response.json
    data = io.BytesIO(response.data)
    if fmt == "csv":
        return pd.read_csv(data, dtype={"row_id": str})
    if fmt == "jsonl":
        return pd.read_json(data, lines=True, dtype={"row_id": str})
    return pq.read_table(data).to_pandas()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_format_scores_every_row_in_order(client, user, workers, trained, model_version, fmt):
    frame = frame_of(3000, seed=1)
    response = submit(client, user["headers"], model_version["id"], encode(frame, fmt), f"rows.{fmt}",
                      id_column="row_id")
    assert response.status_code == 202, response.json
    assert response.json["input_format"] == fmt
    batch = wait_batch(client, user["headers"], response.json["id"])
    assert batch["status"] == "succeeded" and batch["rows_done"] == batch["rows_total"] == 3000
    out = download(client, user["headers"], batch["id"], fmt)
    features = frame.drop(columns="row_id")
    assert out["row_id"].tolist() == frame["row_id"].tolist()
    assert out["prediction"].tolist() == trained.predict(features).tolist()
    np.testing.assert_allclose(out[["proba_no", "proba_yes"]].to_numpy(), trained.predict_proba(features), rtol=1e-6)


def test_200k_rows_across_chunks_and_workers(client, user, workers, trained, model_version, settings):
    frame = frame_of(200_000, seed=2)
    response = submit(client, user["headers"], model_version["id"], encode(frame, "csv"), "big.csv",
                      id_column="row_id", probabilities=False)
    batch = wait_batch(client, user["headers"], response.json["id"], seconds=300)
    assert batch["status"] == "succeeded"
    assert batch["chunks_total"] == batch["chunks_done"] == 200_000 // settings.batch_rows_per_chunk
    out = download(client, user["headers"], batch["id"], "parquet")
    assert len(out) == 200_000 and out["row_id"].tolist() == frame["row_id"].tolist()
    assert (out["prediction"].to_numpy() == trained.predict(frame.drop(columns="row_id"))).all()
    assert "proba_yes" not in out.columns and out["error"].isna().all()


def test_include_input_appends_predictions(client, user, workers, model_version):
    frame = frame_of(50)
    response = submit(client, user["headers"], model_version["id"], encode(frame, "csv"), "rows.csv",
                      include_input=True, id_column="row_id")
    batch = wait_batch(client, user["headers"], response.json["id"])
    out = download(client, user["headers"], batch["id"], "csv")
    assert list(out.columns[:6]) == list(frame.columns)
    np.testing.assert_allclose(out["f3"], frame["f3"])


def bad_rows_csv() -> bytes:
    text = encode(frame_of(10), "csv").decode().splitlines()
    cells = text[4].split(",")
    cells[2] = "not-a-number"
    text[4] = ",".join(cells)  # data row 4
    cells = text[7].split(",")
    cells[3] = ""
    text[7] = ",".join(cells)  # data row 7: a missing value
    return ("\n".join(text) + "\n").encode()


def test_bad_rows_are_skipped_with_reasons(client, user, workers, model_version):
    response = submit(client, user["headers"], model_version["id"], bad_rows_csv(), "bad.csv", id_column="row_id")
    batch = wait_batch(client, user["headers"], response.json["id"])
    assert batch["status"] == "succeeded" and batch["rows_failed"] == 2
    assert {(e["row"], e["column"]) for e in batch["row_errors"]} == {(4, "f1"), (7, "f2")}
    out = download(client, user["headers"], batch["id"], "csv")
    assert out["prediction"].isna().tolist() == [i in (3, 6) for i in range(10)]
    assert "f1" in out.loc[3, "error"] and out["error"].notna().sum() == 2


def test_fail_fast_stops_at_the_first_bad_row(client, user, workers, model_version):
    response = submit(client, user["headers"], model_version["id"], bad_rows_csv(), "bad.csv",
                      id_column="row_id", error_policy="fail_fast")
    batch = wait_batch(client, user["headers"], response.json["id"])
    assert batch["status"] == "failed" and batch["error"]["details"]["row"] == 4
    assert client.get(f"/api/v1/batches/{batch['id']}/result", headers=user["headers"]).status_code == 409


def test_missing_columns_empty_and_header_only_files_are_422(client, user, model_version):
    frame = frame_of(5).drop(columns=["f2", "f4"])
    missing = submit(client, user["headers"], model_version["id"], encode(frame, "csv"), "x.csv")
    assert missing.status_code == 422 and missing.json["error"]["details"]["missing"] == ["f2", "f4"]
    empty = submit(client, user["headers"], model_version["id"], b"", "x.csv")
    assert empty.status_code == 422 and "empty" in empty.json["error"]["message"]
    header_only = submit(client, user["headers"], model_version["id"], b"row_id,f0,f1,f2,f3,f4\n", "x.csv")
    assert header_only.status_code == 422 and "no rows" in header_only.json["error"]["message"]
    assert client.get("/api/v1/batches", headers=user["headers"]).json["total"] == 0


def test_oversize_upload_is_413_and_leaves_nothing(settings, database, redis_conn, user, model_version):
    from web.app import create_app

    small = create_app(replace(settings, max_batch_bytes=10_000)).test_client()
    response = submit(small, user["headers"], model_version["id"], encode(frame_of(2000), "csv"), "big.csv")
    assert response.status_code == 413 and response.json["error"]["code"] in ("payload_too_large",
                                                                               "request_entity_too_large")
    incoming = os.path.join(settings.storage_root, ".incoming")
    assert not os.path.exists(incoming) or os.listdir(incoming) == []


def test_cancel_stops_unstarted_chunks(client, user, workers, model_version):
    response = submit(client, user["headers"], model_version["id"], encode(frame_of(200_000, 3), "csv"), "c.csv")
    cancelled = client.delete(f"/api/v1/batches/{response.json['id']}", headers=user["headers"])
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    time.sleep(3)
    batch = client.get(f"/api/v1/batches/{response.json['id']}", headers=user["headers"]).json
    assert batch["status"] == "cancelled" and batch["chunks_done"] < 10
    assert client.delete(f"/api/v1/batches/{batch['id']}", headers=user["headers"]).status_code == 409


def test_worker_killed_mid_batch_still_yields_every_row_once(client, user, workers, trained, model_version):
    frame = frame_of(200_000, seed=4)
    response = submit(client, user["headers"], model_version["id"], encode(frame, "csv"), "k.csv",
                      id_column="row_id", probabilities=False)
    batch_id = response.json["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/batches/{batch_id}", headers=user["headers"]).json["chunks_done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in workers[0].child_pids():
        os.kill(pid, signal.SIGKILL)
    batch = wait_batch(client, user["headers"], batch_id, seconds=300)
    assert batch["status"] == "succeeded" and batch["rows_done"] == 200_000
    out = download(client, user["headers"], batch_id, "csv")
    assert out["row_id"].tolist() == frame["row_id"].tolist()
    assert (out["prediction"].to_numpy() == trained.predict(frame.drop(columns="row_id"))).all()


def test_another_users_batch_is_not_found(client, user, other_user, workers, model_version):
    response = submit(client, user["headers"], model_version["id"], encode(frame_of(10), "csv"), "o.csv")
    batch_id = response.json["id"]
    for call in (client.get, client.delete):
        assert call(f"/api/v1/batches/{batch_id}", headers=other_user["headers"]).status_code == 404
    assert client.get(f"/api/v1/batches/{batch_id}/result", headers=other_user["headers"]).status_code == 404
    assert submit(client, other_user["headers"], model_version["id"], b"a\n1\n", "o.csv").status_code == 404
