"""Per-model and per-user job analytics, computed in PostgreSQL over a recent time window."""
from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import marshmallow as ma
from flask_smorest import Blueprint
from sqlalchemy import text

from common.extensions import db
from web.registry import get_version
from web.security import auth_required, current_user

blp = Blueprint("stats", __name__, description="Job analytics: throughput, errors, latency percentiles")

UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_SECONDS = 30 * 86400
MAX_POINTS = 1440
STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400)  # the series' bucket: the first giving <= MAX_POINTS
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PERCENTILES = "ARRAY[0.5, 0.95, 0.99]"


def window_seconds(raw: str) -> int:
    """'15m', '1h', '24h', '7d' -> seconds, between one minute and 30 days."""
    match = re.fullmatch(r"([1-9][0-9]{0,5})([mhd])", raw or "")
    seconds = int(match.group(1)) * UNIT_SECONDS[match.group(2)] if match else 0
    if not 60 <= seconds <= MAX_WINDOW_SECONDS:
        raise ma.ValidationError("window must be a number and a unit m, h or d, from 1m to 30d (e.g. 15m, 1h, 24h, 7d)")
    return seconds


def step_seconds(window: int) -> int:
    """Per-minute points up to a day's window; coarser steps beyond, so a series stays under MAX_POINTS."""
    return next((step for step in STEPS if window / step <= MAX_POINTS), STEPS[-1])


class StatsQuerySchema(ma.Schema):
    window = ma.fields.String(load_default="1h", validate=window_seconds,
                              metadata={"description": "how far back: 1m..30d, e.g. 15m, 1h, 24h, 7d"})


class PercentilesSchema(ma.Schema):
    p50 = ma.fields.Float(allow_none=True)
    p95 = ma.fields.Float(allow_none=True)
    p99 = ma.fields.Float(allow_none=True)


class LatencySchema(ma.Schema):
    queue_ms = ma.fields.Nested(PercentilesSchema, metadata={"description": "submit -> a worker starts it"})
    inference_ms = ma.fields.Nested(PercentilesSchema, metadata={"description": "the model's predict (succeeded jobs)"})
    total_ms = ma.fields.Nested(PercentilesSchema, metadata={"description": "submit -> result written"})


class JobCountsSchema(ma.Schema):
    total = ma.fields.Integer()
    queued = ma.fields.Integer()
    running = ma.fields.Integer()
    succeeded = ma.fields.Integer()
    failed = ma.fields.Integer()
    cancelled = ma.fields.Integer()


class SeriesPointSchema(ma.Schema):
    t = ma.fields.DateTime(metadata={"description": "start of the bucket (jobs by submit time)"})
    jobs = ma.fields.Integer()
    succeeded = ma.fields.Integer()
    failed = ma.fields.Integer()
    error_rate = ma.fields.Float(allow_none=True)
    total_p50_ms = ma.fields.Float(allow_none=True)
    total_p95_ms = ma.fields.Float(allow_none=True)
    total_p99_ms = ma.fields.Float(allow_none=True)


class StatsSchema(ma.Schema):
    model_id = ma.fields.UUID(allow_none=True)
    window = ma.fields.String()
    window_seconds = ma.fields.Integer()
    step_seconds = ma.fields.Integer()
    since = ma.fields.DateTime()
    until = ma.fields.DateTime()
    jobs = ma.fields.Nested(JobCountsSchema)
    error_rate = ma.fields.Float(allow_none=True, metadata={"description": "failed / (succeeded + failed)"})
    cache_hit_rate = ma.fields.Float(allow_none=True)
    latency = ma.fields.Nested(LatencySchema)
    series = ma.fields.List(ma.fields.Nested(SeriesPointSchema))


class ModelSummarySchema(ma.Schema):
    model_id = ma.fields.UUID()
    name = ma.fields.String()
    version = ma.fields.Integer()
    jobs = ma.fields.Integer()
    succeeded = ma.fields.Integer()
    failed = ma.fields.Integer()
    error_rate = ma.fields.Float(allow_none=True)
    total_p95_ms = ma.fields.Float(allow_none=True)


class UserStatsSchema(StatsSchema):
    models = ma.fields.List(ma.fields.Nested(ModelSummarySchema),
                            metadata={"description": "each model version with jobs in the window, busiest first"})


SUMMARY_SQL = f"""
SELECT now() - :window AS since, now() AS until, count(*) AS total,
       {", ".join(f"count(*) FILTER (WHERE status = '{s}') AS {s}" for s in STATUSES)},
       count(*) FILTER (WHERE cache_hit) AS cache_hits, count(cache_hit) AS cache_lookups,
       percentile_cont({PERCENTILES}) WITHIN GROUP (ORDER BY queue_ms) AS queue_ms,
       percentile_cont({PERCENTILES}) WITHIN GROUP (ORDER BY inference_ms) AS inference_ms,
       percentile_cont({PERCENTILES}) WITHIN GROUP (ORDER BY total_ms) AS total_ms
FROM prediction_jobs WHERE {{scope}} AND created_at >= now() - :window
"""

# every bucket of the window, empty ones included, so a chart's time axis has no gaps
SERIES_SQL = f"""
WITH buckets AS (
    SELECT generate_series(date_bin(:step, now() - :window, TIMESTAMPTZ '2000-01-01'),
                           date_bin(:step, now(), TIMESTAMPTZ '2000-01-01'), :step) AS t
), counted AS (
    SELECT date_bin(:step, created_at, TIMESTAMPTZ '2000-01-01') AS t, count(*) AS jobs,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           percentile_cont({PERCENTILES}) WITHIN GROUP (ORDER BY total_ms) AS total_ms
    FROM prediction_jobs WHERE {{scope}} AND created_at >= now() - :window
    GROUP BY 1
)
SELECT b.t AS bucket, coalesce(c.jobs, 0) AS jobs, coalesce(c.succeeded, 0) AS succeeded,
       coalesce(c.failed, 0) AS failed, c.total_ms
FROM buckets b LEFT JOIN counted c USING (t) ORDER BY b.t
"""

MODELS_SQL = """
SELECT j.model_version_id AS model_id, m.name, m.version, count(*) AS jobs,
       count(*) FILTER (WHERE j.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE j.status = 'failed') AS failed,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY j.total_ms) AS total_p95_ms
FROM prediction_jobs j JOIN model_versions m ON m.id = j.model_version_id
WHERE j.owner_id = :owner_id AND j.created_at >= now() - :window
GROUP BY j.model_version_id, m.name, m.version
ORDER BY jobs DESC, m.name, m.version LIMIT 100
"""


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _percentiles(values: list[float] | None) -> dict[str, float | None]:
    values = values or [None, None, None]
    return dict(zip(("p50", "p95", "p99"), values))


def _series_point(row: Any) -> dict:
    p50, p95, p99 = row.total_ms or (None, None, None)
    return {"t": row.bucket, "jobs": row.jobs, "succeeded": row.succeeded, "failed": row.failed,
            "error_rate": _rate(row.failed, row.succeeded + row.failed),
            "total_p50_ms": p50, "total_p95_ms": p95, "total_p99_ms": p99}


def job_stats(owner_id: uuid.UUID, window: str, model_id: uuid.UUID | None = None) -> dict:
    """The analytics of one owner's jobs (of one model version, if given) submitted in the last `window`."""
    seconds = window_seconds(window)
    scope = "owner_id = :owner_id" + (" AND model_version_id = :model_id" if model_id else "")
    params = {"owner_id": owner_id, "model_id": model_id, "window": timedelta(seconds=seconds),
              "step": timedelta(seconds=step_seconds(seconds))}
    s = db.session.execute(text(SUMMARY_SQL.format(scope=scope)), params).one()
    series = db.session.execute(text(SERIES_SQL.format(scope=scope)), params).all()
    return {
        "model_id": model_id, "window": window, "window_seconds": seconds, "step_seconds": step_seconds(seconds),
        "since": s.since, "until": s.until,
        "jobs": {"total": s.total, **{status: getattr(s, status) for status in STATUSES}},
        "error_rate": _rate(s.failed, s.succeeded + s.failed),
        "cache_hit_rate": _rate(s.cache_hits, s.cache_lookups),
        "latency": {name: _percentiles(getattr(s, name)) for name in ("queue_ms", "inference_ms", "total_ms")},
        "series": [_series_point(row) for row in series],
    }


def model_summaries(owner_id: uuid.UUID, window: str) -> list[dict]:
    rows = db.session.execute(text(MODELS_SQL), {"owner_id": owner_id,
                                                 "window": timedelta(seconds=window_seconds(window))}).all()
    return [{**row._asdict(), "error_rate": _rate(row.failed, row.succeeded + row.failed)} for row in rows]


@blp.route("/models/<uuid:model_id>/stats", methods=["GET"])
@blp.arguments(StatsQuerySchema, location="query")
@blp.response(200, StatsSchema)
@auth_required
def model_stats(query: dict, model_id: uuid.UUID):
    """One model version's jobs by status, error rate, latency percentiles, cache hit rate and time series."""
    get_version(current_user().id, model_id)
    return job_stats(current_user().id, query["window"], model_id)


@blp.route("/stats", methods=["GET"])
@blp.arguments(StatsQuerySchema, location="query")
@blp.response(200, UserStatsSchema)
@auth_required
def user_stats(query: dict):
    """The same analytics over all your models, with a summary per model version."""
    owner = current_user().id
    return {**job_stats(owner, query["window"]), "models": model_summaries(owner, query["window"])}
