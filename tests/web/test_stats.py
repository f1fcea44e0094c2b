"""Job analytics from PostgreSQL: counts by status, error and cache-hit rates, percentiles, per-minute series."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import func, select

from common.extensions import db
from common.models import JobStatus, PredictionJob
from tests.conftest import upload

# (status, minutes ago, queue_ms, inference_ms, total_ms, cache_hit)
SUCCEEDED = [("succeeded", 3, q, i, t, hit) for q, i, t, hit in zip(
    [2, 4, 6, 8, 10, 12, 14, 16], [1, 2, 3, 4, 5, 6, 7, 8], [10, 20, 30, 40, 50, 60, 70, 80],
    [False, True, True, True, True, True, True, False])]
FAILED = [("failed", 3, 5, None, 100, True), ("failed", 7, 9, None, 200, False)]
UNFINISHED = [("queued", 1, None, None, None, None), ("cancelled", 7, None, None, None, None)]
OLD = [("succeeded", 120, 1, 1, 5000, True)]  # outside a one-hour window


def add_jobs(app, owner_id: str, model_id: str, specs: list[tuple]) -> None:
    """Insert finished jobs with known timings, as workers would have recorded them."""
    now = datetime.now(timezone.utc)
    with app.app_context():
        db.session.add_all(PredictionJob(
            owner_id=uuid.UUID(owner_id), model_version_id=uuid.UUID(model_id), status=JobStatus(status),
            created_at=now - timedelta(minutes=minutes, seconds=10), queue_ms=queue, inference_ms=inference,
            total_ms=total, cache_hit=hit, attempts=1) for status, minutes, queue, inference, total, hit in specs)
        db.session.commit()


def percentiles(values) -> dict:
    """What PostgreSQL's percentile_cont gives: linear interpolation between the closest ranks."""
    return dict(zip(("p50", "p95", "p99"), np.percentile(values, [50, 95, 99]).tolist()))


@pytest.fixture
def owner(client, user) -> dict:
    return {**user, "id": client.get("/api/v1/auth/me", headers=user["headers"]).json["id"]}


@pytest.fixture
def model(client, owner, iris_model) -> dict:
    return upload(client, owner["headers"], iris_model[0], name="analysed")


def test_model_stats_count_statuses_rates_and_percentiles(app, client, owner, model):
    add_jobs(app, owner["id"], model["id"], SUCCEEDED + FAILED + UNFINISHED + OLD)
    response = client.get(f"/api/v1/models/{model['id']}/stats?window=1h", headers=owner["headers"])
    assert response.status_code == 200, response.json
    stats = response.json
    assert stats["model_id"] == model["id"] and stats["window_seconds"] == 3600 and stats["step_seconds"] == 60
    assert stats["jobs"] == {"total": 12, "queued": 1, "running": 0, "succeeded": 8, "failed": 2, "cancelled": 1}
    assert stats["error_rate"] == pytest.approx(2 / 10)
    assert stats["cache_hit_rate"] == pytest.approx(7 / 10)
    finished = SUCCEEDED + FAILED
    expected = {"queue_ms": percentiles([j[2] for j in finished]),
                "inference_ms": percentiles([j[3] for j in SUCCEEDED]),
                "total_ms": percentiles([j[4] for j in finished])}
    for phase, values in expected.items():
        assert stats["latency"][phase] == pytest.approx(values), phase


def test_series_has_every_minute_of_the_window_with_its_jobs(app, client, owner, model):
    add_jobs(app, owner["id"], model["id"], SUCCEEDED + FAILED + UNFINISHED + OLD)
    stats = client.get(f"/api/v1/models/{model['id']}/stats?window=15m", headers=owner["headers"]).json
    series = stats["series"]
    times = [datetime.fromisoformat(p["t"]) for p in series]
    assert all(later - earlier == timedelta(minutes=1) for earlier, later in zip(times, times[1:]))
    assert 15 <= len(series) <= 16 and times[0] <= datetime.fromisoformat(stats["since"])
    assert sum(p["jobs"] for p in series) == stats["jobs"]["total"] == 12
    busiest = max(series, key=lambda p: p["jobs"])  # three minutes ago: 8 succeeded + 1 failed
    assert (busiest["jobs"], busiest["succeeded"], busiest["failed"]) == (9, 8, 1)
    assert busiest["error_rate"] == pytest.approx(1 / 9)
    assert busiest["total_p50_ms"] == pytest.approx(np.percentile([j[4] for j in SUCCEEDED + FAILED[:1]], 50))
    empty = [p for p in series if p["jobs"] == 0]
    assert empty and all(p["error_rate"] is None and p["total_p95_ms"] is None for p in empty)


def test_a_model_without_jobs_has_empty_stats(client, owner, model):
    stats = client.get(f"/api/v1/models/{model['id']}/stats?window=15m", headers=owner["headers"]).json
    assert stats["jobs"]["total"] == 0 and stats["error_rate"] is None and stats["cache_hit_rate"] is None
    assert stats["latency"]["total_ms"] == {"p50": None, "p95": None, "p99": None}
    assert {p["jobs"] for p in stats["series"]} == {0}


def test_windows_pick_a_step_that_bounds_the_series(client, owner, model):
    for window, step in (("15m", 60), ("24h", 60), ("7d", 900), ("30d", 1800)):
        stats = client.get(f"/api/v1/models/{model['id']}/stats?window={window}", headers=owner["headers"]).json
        assert stats["step_seconds"] == step and len(stats["series"]) <= 1441, window


def test_windows_out_of_bounds_are_422(client, owner, model):
    for window in ("0m", "31d", "1y", "15", "m", "-5m", "1.5h", "9999999m"):
        response = client.get(f"/api/v1/models/{model['id']}/stats?window={window}", headers=owner["headers"])
        assert response.status_code == 422 and response.json["error"]["code"] == "validation_error", window


def test_user_stats_cover_all_own_models_and_only_them(app, client, owner, other_user, model, iris_model):
    second = upload(client, owner["headers"], iris_model[0], name="analysed-too")
    add_jobs(app, owner["id"], model["id"], SUCCEEDED)
    add_jobs(app, owner["id"], second["id"], FAILED + UNFINISHED)
    other_id = client.get("/api/v1/auth/me", headers=other_user["headers"]).json["id"]
    theirs = upload(client, other_user["headers"], iris_model[0], name="not-mine")
    add_jobs(app, other_id, theirs["id"], SUCCEEDED)
    stats = client.get("/api/v1/stats?window=1h", headers=owner["headers"]).json
    assert stats["model_id"] is None
    assert stats["jobs"] == {"total": 12, "queued": 1, "running": 0, "succeeded": 8, "failed": 2, "cancelled": 1}
    summaries = {m["model_id"]: m for m in stats["models"]}
    assert set(summaries) == {model["id"], second["id"]}
    assert summaries[model["id"]]["jobs"] == 8 and summaries[model["id"]]["error_rate"] == 0
    assert (summaries[second["id"]]["name"], summaries[second["id"]]["version"]) == ("analysed-too", 1)
    assert summaries[second["id"]]["error_rate"] == 1.0
    assert summaries[model["id"]]["total_p95_ms"] == pytest.approx(np.percentile([j[4] for j in SUCCEEDED], 95))


def test_another_users_model_is_404_and_stats_need_auth(client, owner, other_user, model):
    assert client.get(f"/api/v1/models/{model['id']}/stats", headers=other_user["headers"]).status_code == 404
    assert client.get(f"/api/v1/models/{uuid.uuid4()}/stats", headers=owner["headers"]).status_code == 404
    assert client.get(f"/api/v1/models/{model['id']}/stats").status_code == 401
    assert client.get("/api/v1/stats").status_code == 401


def test_stats_schemas_are_in_the_openapi_spec(client):
    spec = client.get("/api/v1/openapi.json").json
    one = spec["paths"]["/api/v1/models/{model_id}/stats"]["get"]
    assert one["security"] and any(p["name"] == "window" for p in one["parameters"])
    assert one["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Stats")
    assert spec["paths"]["/api/v1/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/UserStats")
    assert {"Stats", "UserStats", "SeriesPoint", "Latency", "Percentiles"} <= set(spec["components"]["schemas"])


def test_stats_are_computed_in_one_query_each_not_row_by_row(app, client, owner, model):
    add_jobs(app, owner["id"], model["id"], SUCCEEDED * 20)
    statements = []
    from sqlalchemy import event

    with app.app_context():
        engine = db.engine
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        client.get(f"/api/v1/models/{model['id']}/stats?window=1h", headers=owner["headers"])
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    analytic = [s for s in statements if "prediction_jobs" in s]
    assert len(analytic) == 2 and all("percentile_cont" in s for s in analytic)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(PredictionJob).where(
            PredictionJob.model_version_id == uuid.UUID(model["id"]))) == 160
