"""Run prediction jobs: claim, get the model from the cache, predict, record each outcome once.

When jobs for one model queue up faster than they run, the worker that claims one also claims
up to ADAPTIVE_BATCH_MAX_JOBS - 1 other queued jobs of that model and scores them in one predict
call (adaptive batching). Each job keeps its own result, timings and compare-and-swap guards, and
the other jobs' own messages later find them finished and write nothing. Jobs submitted while a
message for their model still waits in the queue publish none (web/api/jobs.py: _enqueue):
that message's worker claims them, and sends another message when the batch it claimed was full.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import redis
from celery import current_app, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from common.models import JobStatus
from common.queues import (
    BROKER_ERRORS, JOB_DONE_FIELDS, RUN_PREDICTION, announce_job_done, clear_run_pending,
)
from worker import runtime
from worker.observability import job_finished, model_loaded
from worker.serving import ModelInfo, load_model, model_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    id: uuid.UUID
    model_version_id: uuid.UUID
    instances: list
    attempts: int
    queue_ms: float
    request_id: str | None = None


_CLAIMED = "j.id, j.model_version_id, j.instances, j.attempts, j.queue_ms, j.request_id"
_START = """status = 'running', attempts = j.attempts + 1, started_at = clock_timestamp(), worker = {worker},
            queue_ms = extract(epoch FROM clock_timestamp() - j.created_at) * 1000"""
# A claim commits without waiting for its WAL flush (0.5 ms of fsync on the job's path): a claim lost in a
# PostgreSQL crash leaves its job queued, as if the message had not been taken yet, and any later synchronous
# commit (its FINISH first of all) flushes it. Outcomes are recorded synchronously: a result is announced only
# once it is durable.
_ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
# Queued jobs of the message's job's model (whatever that job's own status).
_QUEUED_OF_ITS_MODEL = """status = 'queued'
          AND model_version_id = (SELECT model_version_id FROM prediction_jobs WHERE id = :job_id)"""
# This job if still queued, plus the oldest queued jobs of its model that no one else is claiming, also when
# the job itself was taken: jobs submitted while this message waited rely on it (web/api/jobs.py: _enqueue).
CLAIM_WITH_PEERS = text(f"""
    WITH target AS (
        SELECT id FROM prediction_jobs WHERE id = :job_id AND status = 'queued'
        FOR UPDATE SKIP LOCKED
    ), peers AS (
        SELECT p.id FROM prediction_jobs p
        WHERE {_QUEUED_OF_ITS_MODEL} AND p.id <> :job_id ORDER BY p.created_at LIMIT :peers
        FOR UPDATE OF p SKIP LOCKED
    )
    UPDATE prediction_jobs j SET {_START.format(worker=":worker")} FROM {_ASYNC_COMMIT}
    WHERE j.id IN (SELECT id FROM target UNION ALL SELECT id FROM peers)
    RETURNING {_CLAIMED}""")
# Only the message's job, if still queued: a message that carries its job's rows is sent for an idle model,
# which no other job relies on (web/api/jobs.py: _enqueue). Sent without waiting for its answer.
CLAIM_ALONE = text(f"""
    UPDATE prediction_jobs j SET {_START.format(worker=":worker")} FROM {_ASYNC_COMMIT}
    WHERE j.id = :job_id AND j.status = 'queued'
    RETURNING j.attempts, j.queue_ms, j.request_id""")
# The model's oldest queued job, for the next message when this worker scores one job per message.
OLDEST_QUEUED = text(f"""
    SELECT id FROM prediction_jobs WHERE {_QUEUED_OF_ITS_MODEL} ORDER BY created_at LIMIT 1""")
# Every job a dead process held (its message's job and the peers it was scoring with it).
TAKE_OVER = text(f"""
    UPDATE prediction_jobs j SET {_START.format(worker=":worker")} FROM {_ASYNC_COMMIT}
    WHERE j.status = 'running' AND j.worker = :dead_worker
    RETURNING {_CLAIMED}""")
HOLDER = text("SELECT status, worker FROM prediction_jobs WHERE id = :job_id")
# One statement records every outcome; the status and attempt guards make a stale attempt write nothing.
_FINISH = """
    UPDATE prediction_jobs j SET status = v.status, result = v.result, error = v.error, cache_hit = v.cache_hit,
           load_ms = v.load_ms, inference_ms = v.inference_ms, finished_at = clock_timestamp(),
           total_ms = extract(epoch FROM clock_timestamp() - j.created_at) * 1000
    FROM jsonb_to_recordset(CAST(:outcomes AS jsonb)) AS v(id uuid, attempts int, status text, result jsonb,
         error jsonb, cache_hit boolean, load_ms float8, inference_ms float8)
    WHERE j.id = v.id AND j.status = 'running' AND {attempt_holds}
    RETURNING j.id, j.request_id, """ + ", ".join(f"j.{field}" for field in JOB_DONE_FIELDS)
FINISH = text(_FINISH.format(attempt_holds="j.attempts = v.attempts"))
# The outcome of a job whose CLAIM_ALONE went ahead of it, guarded by the job running under this process within the
# attempt cap (the outcome's own attempts are not read): a pool child runs one task at a time, and until this task
# has sent this outcome only this claim can have set that (another process takes the job over only once this one
# is dead; this task itself only on its usual path, afterwards). So it is sent before the claim is answered, and
# sent again if its answer was lost.
FINISH_CLAIMED_AHEAD = text(_FINISH.format(attempt_holds="j.worker = :worker AND j.attempts <= :cap"))


def _claim(statement, **params) -> list[ClaimedJob]:
    return [ClaimedJob(*row) for row in runtime.execute(statement, {"worker": runtime.identity(), **params})]


def claim(job_id: uuid.UUID) -> tuple[list[ClaimedJob], bool]:
    """The job (first, if it was queued) and queued jobs of its model, now running here; and whether the
    peers filled the batch (more of the model's jobs may be queued)."""
    peers = max(runtime.settings().adaptive_batch_max_jobs - 1, 0)
    jobs = _claim(CLAIM_WITH_PEERS, job_id=job_id, peers=peers)
    full = peers > 0 and sum(job.id != job_id for job in jobs) >= peers
    return sorted(jobs, key=lambda job: job.id != job_id), full


def _holder(job_id: uuid.UUID) -> tuple[JobStatus, str | None] | None:
    rows = runtime.execute(HOLDER, {"job_id": job_id})
    return (JobStatus(rows[0].status), rows[0].worker) if rows else None


def _orphaned(worker: str | None) -> bool:
    """True when the job's holder can no longer finish it: a process on this host that no longer exists,
    or this process itself (a pool child runs one task at a time, so a job it holds while it is claiming
    is one whose claim committed but whose reply was lost)."""
    if worker == runtime.identity():
        return True
    host, _, pid = (worker or "").rpartition(":")
    if host != runtime.identity().rpartition(":")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


# Estimators that read their input by position. Given the fitted column order (the web orders named features
# by the model), a float array scores exactly as a DataFrame does, without pandas' cost on every call; only
# sklearn's reminder that the array has no column names is silenced. Pipelines and meta-estimators, which may
# select columns by name, always get a DataFrame.
POSITIONAL_ESTIMATORS = ("sklearn.linear_model.", "sklearn.tree.", "sklearn.ensemble._forest", "sklearn.ensemble._gb",
                         "sklearn.neighbors.", "sklearn.naive_bayes.", "sklearn.svm.", "sklearn.discriminant_analysis")
warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)


def build_features(info: ModelInfo, rows: list, model: Any) -> Any:
    """The input matrix: a DataFrame when the model may need its columns' names, else a float array."""
    kinds = info.feature_kinds or ("numeric",) * len(info.feature_names or ())
    numeric = all(kind == "numeric" for kind in kinds)
    if not info.feature_names or (numeric and type(model).__module__.startswith(POSITIONAL_ESTIMATORS)):
        return np.asarray(rows, dtype=np.float64)
    if numeric:  # one float block, no per-column conversion
        return pd.DataFrame(np.asarray(rows, dtype=np.float64), columns=list(info.feature_names))
    frame = pd.DataFrame(rows, columns=list(info.feature_names))
    numeric_columns = [name for name, kind in zip(info.feature_names, kinds) if kind == "numeric"]
    frame[numeric_columns] = frame[numeric_columns].astype("float64")
    return frame


# Classifiers whose predict() is the class of highest predict_proba() (trees and forests by definition; logistic
# regression through a monotone link): one call gives both, 0.25 ms less on a one-row job.
PREDICT_IS_ARGMAX_PROBA = ("sklearn.linear_model._logistic", "sklearn.tree.", "sklearn.ensemble._forest")


def _class_predictions(model: Any, features: Any, probabilities: np.ndarray) -> np.ndarray:
    """predict(), or the class of highest probability where that is what predict() computes (single output)."""
    classes = getattr(model, "classes_", None)
    if (type(model).__module__.startswith(PREDICT_IS_ARGMAX_PROBA) and isinstance(classes, np.ndarray)
            and classes.ndim == 1 and probabilities.shape == (len(probabilities), len(classes))):
        return classes.take(probabilities.argmax(axis=1))
    return np.asarray(model.predict(features))


def predict(model: Any, info: ModelInfo, rows: list) -> list[dict]:
    """One result per row: its prediction and, for classifiers, its class probabilities."""
    features = build_features(info, rows, model)
    if not (info.has_predict_proba and info.task_kind == "classifier"):
        return [{"predictions": [p]} for p in np.asarray(model.predict(features)).tolist()]
    probabilities = np.asarray(model.predict_proba(features))
    predictions = _class_predictions(model, features, probabilities)
    classes = list(info.classes) if info.classes is not None else None
    return [{"predictions": [p], "probabilities": [q], "classes": classes}
            for p, q in zip(predictions.tolist(), probabilities.tolist())]


def merge(rows: list[dict]) -> dict:
    """A job's result from its rows' results."""
    merged = {key: [v for row in rows for v in row[key]] for key in rows[0] if key != "classes"}
    if "classes" in rows[0]:
        merged["classes"] = rows[0]["classes"]
    return merged


def _inject_fault(info: ModelInfo) -> None:
    """Test-only hooks, active only with INFERQ_FAULT_INJECTION: models named fault-crash* / fault-slow-<s>*."""
    if not runtime.settings().fault_injection:
        return
    if info.name.startswith("fault-crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if match := re.match(r"fault-slow-(\d+(?:\.\d+)?)", info.name):
        time.sleep(float(match.group(1)))


def _failure(code: str, message: str) -> dict:
    return {"status": JobStatus.failed, "error": {"code": code, "message": message}}


def _time_limit() -> dict:
    return _failure("time_limit", f"Prediction exceeded {runtime.settings().job_soft_time_limit}s")


def _model_error(exc: Exception) -> dict:
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    return _failure("prediction_error", f"{type(exc).__name__}: {message}")


def _outcomes_json(outcomes: list[tuple[ClaimedJob, dict]]) -> str:
    return json.dumps([{"id": str(job.id), "attempts": job.attempts, "status": values["status"].value,
                        **{k: v for k, v in values.items() if k != "status"}} for job, values in outcomes])


def finish(outcomes: list[tuple[ClaimedJob, dict]]) -> int:
    """Record outcomes in one statement, each only if its attempt still holds the job; announce each one written."""
    written = runtime.execute(FINISH, {"outcomes": _outcomes_json(outcomes)})
    return announce(outcomes, [row._asdict() for row in written])


def announce(outcomes: list[tuple[ClaimedJob, dict]], written_rows: list[dict]) -> int:
    """Wake the waiters of the outcomes FINISH wrote (the announcement is the row as PostgreSQL stored it,
    returned by the same statement), then log and count them; how many were written."""
    written = {row["id"]: row for row in written_rows}
    recorded = [(job, values) for job, values in outcomes if job.id in written]
    try:
        with runtime.redis_client().pipeline(transaction=False) as pipe:
            for job, _ in recorded:
                announce_job_done(pipe, str(job.id), written[job.id], len(outcomes))
            pipe.execute()
    except redis.RedisError as exc:  # only wake-ups: a waiter that cannot read Redis reads the row instead
        log.warning("could not announce finished jobs", extra={"jobs": len(recorded), "error": str(exc)})
    for job, values in recorded:  # after the wake-ups: waiting clients need not wait for logs and metrics
        job_finished(job, values)
    return len(written)


def score(jobs: list[ClaimedJob], info: ModelInfo, model: Any) -> list[dict]:
    """Each job's outcome; one predict call for all, or one per job if the shared call fails."""
    started = time.perf_counter()
    try:
        rows = predict(model, info, [row for job in jobs for row in job.instances])
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # a model's own error is the user's answer, not a worker crash
        if len(jobs) == 1:
            return [_model_error(exc)]
        return [outcome for job in jobs for outcome in score([job], info, model)]
    inference_ms = (time.perf_counter() - started) * 1000
    outcomes, offset = [], 0
    for job in jobs:
        n = len(job.instances)
        outcomes.append({"status": JobStatus.succeeded, "result": merge(rows[offset:offset + n]),
                         "inference_ms": inference_ms})
        offset += n
    return outcomes


def serve(jobs: list[ClaimedJob]) -> None:
    """Score claimed jobs of one model and record success or a user-facing failure for each."""
    cap = runtime.settings().job_max_attempts
    exhausted = [job for job in jobs if job.attempts > cap]
    if exhausted:
        finish([(job, _failure("attempts_exhausted", f"The job did not complete in {cap} attempts "
                                                     "(its worker crashed or was lost each time)")) for job in exhausted])
    jobs = [job for job in jobs if job.attempts <= cap]
    if jobs:
        finish(list(zip(jobs, _scored(model_info(jobs[0].model_version_id), jobs))))


def _scored(info: ModelInfo, jobs: list[ClaimedJob]) -> list[dict]:
    """Each job's outcome, with the fields of the model's lookup (a cache hit, or how long the load took)."""
    lookup = load_model(info)
    model_loaded(lookup)
    _inject_fault(info)
    cache = {"cache_hit": lookup.hit, "load_ms": lookup.load_seconds * 1000}
    return [{**cache, **outcome} for outcome in score(jobs, info, lookup.model)]


def serve_with_rows(job_id: uuid.UUID, version_id: uuid.UUID, instances: list) -> bool:
    """Score the rows the job's message carried while its claim is in flight, and send the outcome right behind
    the claim on the same connection: one wait for PostgreSQL where claim then record would be two. False when
    the usual path must decide what this delivery does (the claim took nothing and nothing was recorded: the
    job is not queued). The claim is sent before the scoring starts, so a job whose scoring crashes its process
    still has its attempt counted; only first deliveries come here, so such a job is claimed, and checked
    against the attempt cap, before it is scored again."""
    job = ClaimedJob(job_id, version_id, instances, attempts=0, queue_ms=None)  # its attempt: the claim's answer
    ahead = {"worker": runtime.identity(), "cap": runtime.settings().job_max_attempts}
    try:
        outcome, claimed, written = _score_claimed_ahead(job, ahead)
        if isinstance(written, psycopg.OperationalError):  # lost with the connection: again, once PostgreSQL answers
            written = [row._asdict() for row in runtime.execute(FINISH_CLAIMED_AHEAD, ahead)]
        if isinstance(written, list) and written:
            announce([(_claimed(job, written[0]), outcome)], written)
            return True
        if isinstance(claimed, Exception):
            raise claimed  # whether the claim took the job is unknown: the usual path finds out
        if not claimed:
            return False
        held = _claimed(job, claimed[0])
        if held.attempts > ahead["cap"]:
            serve([held])  # records the exhausted attempts
        else:  # it wrote nothing, or wrote and its answer was lost: finish() writes nothing twice
            finish([(held, outcome)])
        return True
    except SoftTimeLimitExceeded:  # out of time after the scoring: the job fails as it would have during it
        runtime.execute(FINISH_CLAIMED_AHEAD, {**ahead, "outcomes": _outcomes_json([(job, _time_limit())])})
        return True


def _score_claimed_ahead(job: ClaimedJob, ahead: dict) -> tuple[dict, runtime.Answer, runtime.Answer]:
    """Send the job's claim and, without waiting for its answer, score the job's rows and send the outcome behind
    it (`ahead` gains the outcome): the outcome, and the claim's and the outcome's answers."""
    with runtime.pipeline(CLAIM_ALONE, {"job_id": job.id, "worker": ahead["worker"]}) as sent:
        try:
            outcome = _scored(model_info(job.model_version_id), [job])[0]
        except SoftTimeLimitExceeded:
            outcome = _time_limit()
        ahead["outcomes"] = _outcomes_json([(job, outcome)])
        sent.send(FINISH_CLAIMED_AHEAD, ahead)
        claimed, written = sent.results()
    return outcome, claimed, written


def _claimed(job: ClaimedJob, row: dict) -> ClaimedJob:
    """The job as its claim (or its outcome's row) says this attempt holds it."""
    return replace(job, attempts=row["attempts"], queue_ms=row["queue_ms"], request_id=row["request_id"])


def _take_over_if_orphaned(job_id: uuid.UUID) -> list[ClaimedJob]:
    """The jobs a dead process held, if it held this running job; else nothing (finished, cancelled or
    deleted; or held by a live or remote worker, e.g. scored in a peer's batch: that worker records it,
    and if it dies its own message is redelivered or the reconciler requeues the job)."""
    holder = _holder(job_id)
    if holder is None or holder[0] != JobStatus.running or not _orphaned(holder[1]):
        return []
    return _claim(TAKE_OVER, dead_worker=holder[1])


def _pass_on(job_id: uuid.UUID, model_id: str, full: bool) -> None:
    """Send the model's next message when jobs that skipped their own may still be queued: this batch was
    full, or this worker scores one job per message (ADAPTIVE_BATCH_MAX_JOBS=1 here but not in the web)."""
    if full:
        next_id = job_id  # its peers are the model's next queued jobs
    elif runtime.settings().adaptive_batch_max_jobs < 2:
        next_id = next(iter(row.id for row in runtime.execute(OLDEST_QUEUED, {"job_id": job_id})), None)
    else:
        return
    if next_id is None:
        return
    try:
        current_app.send_task(RUN_PREDICTION, args=[str(next_id), model_id], retry=False)
    except BROKER_ERRORS as exc:  # score what was claimed
        log.warning("could not pass the model's message on; the reconciler enqueues its jobs",
                    extra={"model_id": model_id, "error": str(exc)})


def _clear_run_pending(model_id: str) -> None:
    try:
        clear_run_pending(runtime.redis_client(), model_id)
    except redis.RedisError as exc:  # the mark expires on its own; until then the model's new jobs wait
        log.warning("could not clear the model's pending message mark", extra={"error": str(exc)})


@shared_task(name=RUN_PREDICTION, bind=True)
def run_prediction(self, job_id: str, model_id: str | None = None, instances: list | None = None,
                   model_version_id: str | None = None) -> None:
    """Run a prediction job and the queued jobs of its model; a duplicate delivery of a finished job writes
    nothing. `model_id` (from the web, not the reconciler) says the message was its model's pending one;
    `instances` and `model_version_id`, that the job's rows came with it (a small job of an idle model)."""
    job_uuid = uuid.UUID(job_id)
    if instances is not None and not (self.request.delivery_info or {}).get("redelivered"):
        try:
            if serve_with_rows(job_uuid, uuid.UUID(model_version_id), instances):
                return
        except (psycopg.Error, DBAPIError, LookupError) as exc:  # the usual claim (which retries) finds the job
            log.warning("could not serve the job with the rows its message carried; claiming it as usual",
                        extra={"error": str(exc)})  # queued, held by this process, or gone
    if model_id:  # before claiming: any job that skipped its own message is committed by now
        _clear_run_pending(model_id)
    jobs, full = claim(job_uuid)
    if model_id:
        _pass_on(job_uuid, model_id, full)
    if not any(job.id == job_uuid for job in jobs):  # a job taken twice keeps its latest attempt
        jobs = list({job.id: job for job in jobs + _take_over_if_orphaned(job_uuid)}.values())
    if not jobs:
        return
    try:
        serve(jobs)
    except SoftTimeLimitExceeded:
        finish([(job, _time_limit()) for job in jobs])
