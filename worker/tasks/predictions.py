"""Run one prediction job: claim it, get the model from the cache, predict, record the outcome once."""
from __future__ import annotations

import logging
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, or_, select, update

from common.models import JobStatus, PredictionJob
from common.queues import RUN_PREDICTION, job_done_channel
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


def _claim(job_id: uuid.UUID, takeover_from: str | None = None) -> ClaimedJob | None:
    """Compare-and-swap queued -> running (or take over from a dead worker); None if not ours to run."""
    claimable = PredictionJob.status == JobStatus.queued
    if takeover_from:
        claimable = or_(claimable, (PredictionJob.status == JobStatus.running) & (PredictionJob.worker == takeover_from))
    now = func.clock_timestamp()
    stmt = (update(PredictionJob).where(PredictionJob.id == job_id, claimable)
            .values(status=JobStatus.running, attempts=PredictionJob.attempts + 1, started_at=now,
                    worker=runtime.identity(),
                    queue_ms=func.extract("epoch", now - PredictionJob.created_at) * 1000)
            .returning(PredictionJob.model_version_id, PredictionJob.instances, PredictionJob.attempts,
                       PredictionJob.queue_ms))
    with runtime.session() as s:
        row = s.execute(stmt).first()
        s.commit()
    return ClaimedJob(job_id, *row) if row else None


def _holder(job_id: uuid.UUID) -> tuple[JobStatus, str | None] | None:
    with runtime.session() as s:
        row = s.execute(select(PredictionJob.status, PredictionJob.worker).where(PredictionJob.id == job_id)).first()
    return (row.status, row.worker) if row else None


def _is_dead_local_worker(worker: str | None) -> bool:
    """True when the job's holder is a process on this host that no longer exists."""
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


def build_features(info: ModelInfo, rows: list) -> Any:
    """The input matrix: a DataFrame when the model was trained on named columns, else a float array."""
    if info.feature_names:
        frame = pd.DataFrame(rows, columns=list(info.feature_names))
        kinds = info.feature_kinds or ("numeric",) * len(info.feature_names)
        numeric = [name for name, kind in zip(info.feature_names, kinds) if kind == "numeric"]
        frame[numeric] = frame[numeric].astype("float64")
        return frame
    return np.asarray(rows, dtype=np.float64)


def predict(model: Any, info: ModelInfo, rows: list) -> dict:
    features = build_features(info, rows)
    result: dict[str, Any] = {"predictions": np.asarray(model.predict(features)).tolist()}
    if info.has_predict_proba and info.task_kind == "classifier":
        result["probabilities"] = np.asarray(model.predict_proba(features)).tolist()
        result["classes"] = list(info.classes) if info.classes is not None else None
    return result


def _inject_fault(info: ModelInfo) -> None:
    """Test-only hooks, active only with INFERQ_FAULT_INJECTION: models named fault-crash* / fault-slow-<s>*."""
    if not runtime.settings().fault_injection:
        return
    if info.name.startswith("fault-crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if match := re.match(r"fault-slow-(\d+(?:\.\d+)?)", info.name):
        time.sleep(float(match.group(1)))


def _finish(job: ClaimedJob, values: dict) -> bool:
    """Record the outcome in one transaction, only if this attempt still holds the job."""
    now = func.clock_timestamp()
    stmt = (update(PredictionJob)
            .where(PredictionJob.id == job.id, PredictionJob.status == JobStatus.running,
                   PredictionJob.attempts == job.attempts)
            .values(finished_at=now, total_ms=func.extract("epoch", now - PredictionJob.created_at) * 1000,
                    **values))

    def write() -> int:
        with runtime.session() as s:
            count = s.execute(stmt).rowcount
            s.commit()
            return count

    written = runtime.with_db_retry(write) == 1
    if written:
        job_finished(job, values)
        runtime.redis_client().publish(job_done_channel(str(job.id)), values["status"].value)
    return written


def _fail_exhausted(job: ClaimedJob) -> None:
    cap = runtime.settings().job_max_attempts
    _finish(job, {"status": JobStatus.failed, "error": {
        "code": "attempts_exhausted",
        "message": f"The job did not complete in {cap} attempts (its worker crashed or was lost each time)"}})


def execute(job: ClaimedJob) -> None:
    """Score a claimed job and record success or a user-facing failure."""
    if job.attempts > runtime.settings().job_max_attempts:
        return _fail_exhausted(job)
    info = model_info(job.model_version_id)
    lookup = load_model(info)
    model_loaded(lookup)
    _inject_fault(info)
    started = time.perf_counter()
    try:
        result = predict(lookup.model, info, job.instances)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # a model's own error is the user's answer, not a worker crash
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        _finish(job, {"status": JobStatus.failed, "cache_hit": lookup.hit,
                      "error": {"code": "prediction_error", "message": f"{type(exc).__name__}: {message}"}})
        return
    _finish(job, {"status": JobStatus.succeeded, "result": result, "cache_hit": lookup.hit,
                  "load_ms": lookup.load_seconds * 1000, "inference_ms": (time.perf_counter() - started) * 1000})


@shared_task(name=RUN_PREDICTION, bind=True, max_retries=None)
def run_prediction(self, job_id: str) -> None:
    """Run a prediction job; a duplicate delivery of a finished or running job writes nothing."""
    job_uuid = uuid.UUID(job_id)
    job = runtime.with_db_retry(lambda: _claim(job_uuid))
    if job is None:
        holder = _holder(job_uuid)
        if holder is None or holder[0] != JobStatus.running:
            return  # finished, cancelled or deleted: nothing to do
        if not _is_dead_local_worker(holder[1]):
            # held by a live (or remote) worker: look again later; the reconciler covers lost holders
            raise self.retry(countdown=5)
        job = _claim(job_uuid, takeover_from=holder[1])
        if job is None:
            return
    try:
        execute(job)
    except SoftTimeLimitExceeded:
        _finish(job, {"status": JobStatus.failed, "error": {
            "code": "time_limit", "message": f"Prediction exceeded {runtime.settings().job_soft_time_limit}s"}})
