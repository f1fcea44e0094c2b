"""Prediction jobs: submit against a model, poll or wait for the result, list and cancel."""
from __future__ import annotations

import uuid
from contextlib import nullcontext
from datetime import datetime
from types import SimpleNamespace

import marshmallow as ma
import psycopg
import redis
from flask import current_app, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from psycopg.types.json import Jsonb
from sqlalchemy import func, select, update

from common.extensions import db
from common.logging import log_context
from common.models import FINAL_STATUSES, JobStatus, PredictionJob
from common.queues import MESSAGE_ROWS_MAX_VALUES, RUN_PREDICTION, mark_run_pending
from web.direct_sql import fetch_one
from web.errors import ApiError, not_found
from web.instances import validate_instances
from web.pagination import PageQuerySchema, page_schema, paginate
from web.observability import job_submitted, request_id
from web.publishing import publish
from web.job_waiter import Watch
from web.registry import get_version, input_schema, require_servable
from web.security import (
    LOGIN_VALID, auth_required, current_user, mark_login_confirmed, unconfirmed_login,
)

blp = Blueprint("jobs", __name__, description="Asynchronous prediction jobs")
STATUSES = [s.value for s in JobStatus]


class InstancesField(ma.fields.List):
    """A list of rows: arrays of values, or objects of named features."""

    # the documented shape; the row limit (a setting) and the row width (the model's) are web/instances.py's
    ROW = {"anyOf": [{"type": "array"}, {"type": "object"}]}

    def __init__(self, **kwargs):
        kwargs["metadata"] = {"minItems": 1, **kwargs.get("metadata", {})}
        super().__init__(ma.fields.Raw(metadata=self.ROW), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        rows = super()._deserialize(value, attr, data, **kwargs)
        if any(not isinstance(row, (list, dict)) for row in rows):
            raise ma.ValidationError("each instance must be an array of values or an object of named features")
        return rows


class PredictRequestSchema(ma.Schema):
    instances = InstancesField(required=True)


class WaitQuerySchema(ma.Schema):
    wait = ma.fields.Float(load_default=0.0, validate=ma.validate.Range(min=0, max=300),
                           metadata={"description": "seconds to wait for the result (capped by MAX_WAIT_SECONDS)"})


class JobQuerySchema(PageQuerySchema):
    model_id = ma.fields.UUID()
    status = ma.fields.String(validate=ma.validate.OneOf(STATUSES))


class TimingsSchema(ma.Schema):
    queue_ms = ma.fields.Float(allow_none=True)
    load_ms = ma.fields.Float(allow_none=True)
    inference_ms = ma.fields.Float(allow_none=True)
    total_ms = ma.fields.Float(allow_none=True)


TIMINGS = TimingsSchema()


class JobSchema(ma.Schema):
    id = ma.fields.UUID()
    model_id = ma.fields.UUID(attribute="model_version_id")
    status = ma.fields.Function(lambda j: j.status.value)
    url = ma.fields.Function(lambda j: url_for("jobs.JobDetail", job_id=j.id))
    result = ma.fields.Dict(allow_none=True)
    error = ma.fields.Dict(allow_none=True)
    timings = ma.fields.Function(lambda j: TIMINGS.dump(j))
    cache_hit = ma.fields.Boolean(allow_none=True)
    worker = ma.fields.String(allow_none=True)
    attempts = ma.fields.Integer()
    created_at = ma.fields.DateTime()
    started_at = ma.fields.DateTime(allow_none=True)
    finished_at = ma.fields.DateTime(allow_none=True)


JobPageSchema = page_schema(JobSchema)
# A job as answered: its mapped row, or on the submit's path a plain copy of it (_insert_if_servable, _settled)
AnyJob = PredictionJob | SimpleNamespace


def _get_job(job_id: uuid.UUID) -> PredictionJob:
    job = db.session.get(PredictionJob, job_id)
    if job is None or job.owner_id != current_user().id:
        raise not_found("Job")
    return job


def _existing_for_key(key: str) -> PredictionJob | None:
    return db.session.scalar(select(PredictionJob).where(
        PredictionJob.owner_id == current_user().id, PredictionJob.idempotency_key == key))


# What a job's answer shows of its row (all of it but the instances, which the client sent), as a new job has it.
NEW_JOB = {column.key: None for column in PredictionJob.__table__.c if column.key != "instances"} | {
    "status": JobStatus.queued, "attempts": 0}
# The submit's one write (web/direct_sql.py): the row goes in only while its model is not archived and the
# caller's login (when the request deferred that check: web/security.py) is not revoked, committed with the
# synchronous_commit given. Had a first run committed before its connection dropped, the run on a fresh connection
# fails on the job's id (_insert_job).
INSERT_JOB = f"""
    INSERT INTO prediction_jobs (id, owner_id, model_version_id, status, instances, attempts, idempotency_key,
                                 request_id)
    SELECT %(id)s, %(owner_id)s, %(model_version_id)s, 'queued', %(instances)s, 0, %(idempotency_key)s,
           %(request_id)s
    FROM (SELECT set_config('synchronous_commit', %(synchronous_commit)s, true)) AS commit_mode
    WHERE EXISTS (SELECT FROM model_versions WHERE id = %(model_version_id)s AND status <> 'archived')
      AND (CAST(%(login)s AS uuid) IS NULL OR ({LOGIN_VALID}))
    RETURNING created_at"""


def _insert_if_servable(job_id: uuid.UUID, model_id: uuid.UUID, rows: list, key: str | None,
                        flush: bool) -> SimpleNamespace | None:
    """Insert and commit the job row in one statement, only while its model is not archived (and the caller's
    login is valid); the job as committed, or None when the model cannot serve. Without `flush` the commit does
    not wait for the WAL to reach disk (see _flushed).

    The job answered is a plain copy of its row, not an ORM object: the submit never reads the row back, and
    building and serialising a mapped instance cost a twentieth of its CPU."""
    fields = {"id": job_id, "owner_id": current_user().id, "model_version_id": model_id,
              "idempotency_key": key, "request_id": request_id()}
    # a read so far (API key, reference) holds a connection: at most one per request
    if db.session.registry.has() and db.session().in_transaction():
        db.session.commit()
    values = {**fields, "instances": Jsonb(rows), "synchronous_commit": "on" if flush else "off",
              "login": unconfirmed_login()}
    if (inserted := fetch_one(INSERT_JOB, values)) is None:
        return None  # a revoked login is answered as such: auth_required checks it before any answer
    mark_login_confirmed()
    return SimpleNamespace(**{**NEW_JOB, **fields, "created_at": inserted[0]})


def _insert_job(job_id: uuid.UUID, model_id: uuid.UUID, rows: list, key: str | None,
                flush: bool) -> tuple[AnyJob, bool]:
    """Commit the job row (before any message exists); (job, created)."""
    try:
        job = _insert_if_servable(job_id, model_id, rows, key, flush)
    except psycopg.IntegrityError:
        if (inserted := db.session.get(PredictionJob, job_id)) is not None:  # committed by a first run
            return inserted, True
        existing = _existing_for_key(key) if key else None
        if existing is None:
            raise
        return existing, False
    if job is None:  # archived (or deleted) since its schema was cached: answer as a fresh read says
        require_servable(get_version(current_user().id, model_id))
        raise not_found("Model")
    return job, True


def _settled(job: AnyJob, final: dict) -> SimpleNamespace:
    """The job with the final fields its worker announced (a copy of its committed row)."""
    return SimpleNamespace(**{**{key: getattr(job, key) for key in NEW_JOB}, **final,
                              "status": JobStatus(final["status"])})


def _wait_seconds(asked: float) -> float:
    return min(asked, current_app.extensions["settings"].max_wait_seconds)


def _await_end(job: AnyJob, watch: Watch, seconds: float, check_first: bool) -> AnyJob:
    read = job

    def finished() -> bool:
        nonlocal read
        read = db.session.get(PredictionJob, job.id, populate_existing=True)
        db.session.commit()  # end the read: a waiting request holds no database connection
        if read is None:  # its owner was deleted meanwhile
            raise not_found("Job")
        return read.status in FINAL_STATUSES

    if check_first and finished():  # it may have ended long ago: its announcement expires
        return read
    final = watch.wait(seconds, finished)
    if final is not None:
        return _settled(job, final)
    if read.status not in FINAL_STATUSES:  # time is up: answer the row as it is now
        finished()
    return read


def _wait_for(job: AnyJob, seconds: float) -> AnyJob:
    """The job once it ends (announced in Redis), or as its row is after `seconds`."""
    seconds = _wait_seconds(seconds)
    if seconds <= 0 or job.status in FINAL_STATUSES:
        return job
    with _watching(job.id, job.model_version_id, seconds) as watch:
        return _await_end(job, watch, seconds, check_first=True)


def _watching(job_id: uuid.UUID, model_id: uuid.UUID, seconds: float):
    """A watch on the job's end, or nothing when the client does not wait."""
    return current_app.extensions["job_waiter"].watch(str(job_id), str(model_id)) if seconds > 0 else nullcontext()


def _enqueue(job: AnyJob, rows: list) -> bool:
    """Publish the job's message, unless a message for its model still waits in the queue: the worker that
    takes that one claims this committed job with the model's other queued jobs (adaptive batching). A
    small job of an idle model sends its rows along (worker/tasks/predictions.py: serve_with_rows). False
    when the broker is down (the reconciler will enqueue the job)."""
    job_id, model_id = str(job.id), str(job.model_version_id)
    waiter = current_app.extensions["job_waiter"]
    with_rows = {}
    if current_app.extensions["settings"].adaptive_batch_max_jobs < 2 or not waiter.may_be_queueing(model_id, job_id):
        args = [job_id]  # idle: no mark, and so no Redis round trips for it here or in the worker
        if len(rows) * len(rows[0]) <= MESSAGE_ROWS_MAX_VALUES:  # its worker scores them while claiming it
            with_rows = {"instances": rows, "model_version_id": model_id}
    else:
        try:
            if not mark_run_pending(current_app.extensions["redis"], model_id):
                return True
        except redis.RedisError:
            pass  # publish() reports the broker down; the reconciler enqueues the job later
        args = [job_id, model_id]  # the worker clears the mark before it claims
    if not publish(RUN_PREDICTION, *args, **with_rows):
        return False
    waiter.message_sent(model_id, job_id)
    return True


def _publish_and_wait(job: AnyJob, rows: list, watch: Watch | None, seconds: float) -> AnyJob:
    """Enqueue a new job and, if asked, wait for it on the watch its submit began: no read of its row."""
    # the message carries the job's log context, so the worker need not read it back
    with log_context(job_id=str(job.id), model_id=str(job.model_version_id)):
        sent = _enqueue(job, rows)
    job_submitted(job)
    # unsent, it cannot end before the reconciler's next pass: answer now
    return _await_end(job, watch, seconds, check_first=False) if watch and sent else job


def _flushed(job: AnyJob) -> AnyJob:
    """The job, its row on disk before its id is answered. A job submitted with ?wait is committed without
    waiting for the WAL flush (0.5 ms of fsync on its path): the worker's synchronous commit of its outcome
    flushes it too (the WAL is written in order), so only an unfinished answer (the wait ran out, or an
    Idempotency-Key replay) first commits a no-op update of the row synchronously."""
    if job.status not in FINAL_STATUSES:
        db.session.execute(update(PredictionJob).where(PredictionJob.id == job.id)
                           .values(status=PredictionJob.status))
        db.session.commit()
    return job


def _answer(job: AnyJob):
    status = 200 if job.status in FINAL_STATUSES else 202
    return job, status, {"Location": url_for("jobs.JobDetail", job_id=job.id)}


@blp.route("/predict/<string:model_ref>", methods=["POST"])
@blp.arguments(PredictRequestSchema())
@blp.arguments(WaitQuerySchema(), location="query")
@blp.response(202, JobSchema)
@blp.alt_response(200, schema=JobSchema, description="The finished job, when it ended within `wait` seconds")
@blp.alt_response(409, description="The model is archived")
@auth_required(revocation_checked_by_write=True)
def predict(body: dict, query: dict, model_ref: str):
    """Submit a prediction job against a model id or reference (name@alias, name@v3, name@latest)."""
    key = request.headers.get("Idempotency-Key")
    if key and len(key) > 255:
        raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key must be at most 255 characters")
    if key and (existing := _existing_for_key(key)):
        return _answer(_flushed(_wait_for(existing, query["wait"])))
    model = input_schema(current_user().id, model_ref)
    limit = current_app.extensions["settings"].max_instances_per_job
    rows = validate_instances(model, body["instances"], limit)
    job_id, seconds = uuid.uuid4(), _wait_seconds(query["wait"])
    # watched from before its row exists, so that other submits here see a request waiting (may_be_queueing);
    # its end stays readable in Redis, so one announced before the wait begins is not missed
    with _watching(job_id, model.id, seconds) as watch:
        job, created = _insert_job(job_id, model.id, rows, key, flush=watch is None)
        if not created:
            return _answer(_flushed(_wait_for(job, query["wait"])))
        job = _publish_and_wait(job, rows, watch, seconds)
        return _answer(_flushed(job) if watch else job)


@blp.route("/jobs")
class Jobs(MethodView):
    @blp.arguments(JobQuerySchema, location="query")
    @blp.response(200, JobPageSchema)
    @auth_required
    def get(self, query: dict):
        """List your jobs, newest first."""
        filters = [PredictionJob.owner_id == current_user().id]
        if query.get("model_id"):
            filters.append(PredictionJob.model_version_id == query["model_id"])
        if query.get("status"):
            filters.append(PredictionJob.status == JobStatus(query["status"]))
        return paginate(PredictionJob, filters, [PredictionJob.created_at.desc()], query)


@blp.route("/jobs/<uuid:job_id>")
class JobDetail(MethodView):
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(200, JobSchema)
    @auth_required
    def get(self, query: dict, job_id: uuid.UUID):
        """A job's status, result, error and timings; `wait` long-polls until it ends."""
        return _wait_for(_get_job(job_id), query["wait"])

    @blp.response(200, JobSchema)
    @blp.alt_response(409, description="The job is already running or finished")
    @auth_required
    def delete(self, job_id: uuid.UUID):
        """Cancel a queued job; a worker that receives it later skips it."""
        job = _get_job(job_id)
        cancelled = db.session.execute(
            update(PredictionJob).where(PredictionJob.id == job.id, PredictionJob.status == JobStatus.queued)
            .values(status=JobStatus.cancelled, finished_at=func.clock_timestamp())).rowcount
        db.session.commit()
        db.session.refresh(job)
        if not cancelled:
            raise ApiError(409, "not_cancellable", f"The job is {job.status.value} and can no longer be cancelled")
        return job
