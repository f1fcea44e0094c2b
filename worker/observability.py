"""Worker wiring for JSON logs and metrics, through Celery's signals.

- every process logs JSON (`setup_logging` replaces Celery's own log set-up), without Celery's per-task
  lines for prediction jobs (each job's own line says more);
- the worker's main process picks its metrics directory and serves the metrics (`celeryd_init`);
- each task's log lines carry its job, model, user and the request id of the submit that created it;
- each task's run time, and the model cache's counts, are recorded after it runs.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from celery.signals import (
    before_task_publish, celeryd_init, setup_logging, task_postrun, task_prerun, worker_process_shutdown,
)
from sqlalchemy import select

from common.logging import (
    CONTEXT_HEADER, attach_context_to_message, bind, configure_logging, current_context, reset,
)
from common.models import BatchJob, PredictionJob
from common.queues import FINISH_BATCH, PLAN_BATCH, RUN_PREDICTION, SCORE_CHUNK
from worker import metrics, runtime

log = logging.getLogger("inferq.worker")
_running: dict[str, tuple[float, Any]] = {}  # task id -> (start, log context token)
BATCH_TASKS = (PLAN_BATCH, SCORE_CHUNK, FINISH_BATCH)  # their first argument is the batch id


def _level(loglevel: int | str | None) -> str:
    return logging.getLevelName(loglevel) if isinstance(loglevel, int) else str(loglevel or "INFO").upper()


class _WithoutPredictionTaskLines(logging.Filter):
    """Drops Celery's own INFO lines for each prediction task ("received", "succeeded"): the job's "job finished"
    line says more (its job, model, user, timings) and each line cost as much CPU as scoring a job. Batch and
    maintenance tasks keep theirs; warnings and errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and isinstance(record.args, dict)
                    and record.args.get("name") == RUN_PREDICTION)


CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def _configure_logging(level: str) -> None:
    configure_logging(level, "worker")
    for name in CELERY_TASK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutPredictionTaskLines) for f in logger.filters):
            logger.addFilter(_WithoutPredictionTaskLines())


@setup_logging.connect
def _json_logs(loglevel: int | str | None = None, **_kwargs: Any) -> None:
    _configure_logging(_level(loglevel))


@celeryd_init.connect
def _worker_starting(sender: str | None = None, instance: Any = None, options: dict | None = None,
                     **_kwargs: Any) -> None:
    """JSON from the first line (no banner, warnings as log records); metrics directory and exporter."""
    _configure_logging(_level((options or {}).get("loglevel")))
    if instance is not None:
        instance.quiet = True  # the banner is multi-line text; "ready" and the exporter line say the same
    settings = runtime.settings()
    path = metrics.use_multiprocess_dir(metrics.node_metrics_dir(settings, sender or f"worker@{os.uname().nodename}"))
    metrics.start_exporter(settings, path)


def _row_context(table: Any, key: str, row_id: str) -> dict[str, Any]:
    """Who and what a job or batch is about, from its row: the database keeps the submit's request id
    (a message re-enqueued by the reconciler carries no header)."""
    try:
        with runtime.session() as s:
            row = s.execute(select(table.request_id, table.owner_id, table.model_version_id)
                            .where(table.id == uuid.UUID(row_id))).first()
    except Exception:  # a context lookup must never fail the task it describes
        log.warning("could not read the log context", extra={key: row_id}, exc_info=True)
        return {key: row_id}
    if row is None:
        return {key: row_id}
    return {key: row_id, "request_id": row.request_id, "user_id": row.owner_id, "model_id": row.model_version_id}


def job_context(job_id: str) -> dict[str, Any]:
    return _row_context(PredictionJob, "job_id", job_id)


def batch_context(batch_id: str) -> dict[str, Any]:
    return _row_context(BatchJob, "batch_id", batch_id)


def _task_context(task: Any, args: tuple | None) -> dict[str, Any]:
    context = dict(task.request.get(CONTEXT_HEADER) or {})  # what the publisher bound, e.g. a web request
    key, lookup = {RUN_PREDICTION: ("job_id", job_context),
                   **dict.fromkeys(BATCH_TASKS, ("batch_id", batch_context))}.get(task.name, (None, None))
    if lookup and args:
        if context.get("request_id"):  # published by the submit (or its batch): no need to read the row
            context[key] = str(args[0])
        else:  # re-sent by the reconciler: the row keeps the submit's context
            context.update({k: v for k, v in lookup(str(args[0])).items() if v is not None})
    return context


@task_prerun.connect
def _task_started(task_id: str | None = None, task: Any = None, args: tuple | None = None, **_kwargs: Any) -> None:
    token = bind(**_task_context(task, args))
    _running[task_id] = (time.perf_counter(), token)


@task_postrun.connect
def _task_finished(task_id: str | None = None, task: Any = None, state: str | None = None, **_kwargs: Any) -> None:
    started, token = _running.pop(task_id, (None, None))
    try:
        if started is not None:
            metrics.record_task(task.name, state or "UNKNOWN", time.perf_counter() - started)
        metrics.sync_model_cache(runtime.model_cache())
    finally:
        if token is not None:
            reset(token)


def task_elapsed(task_id: str | None) -> float | None:
    started = _running.get(task_id or "", (None, None))[0]
    return None if started is None else time.perf_counter() - started


def _own_context(job: Any) -> dict[str, Any]:
    """A job scored alongside the message's job (adaptive batching) is logged with its own submit's context."""
    if current_context().get("job_id") in (None, str(job.id)):
        return {}
    if getattr(job, "request_id", None) is not None:
        return {"request_id": job.request_id}
    return {k: str(v) for k, v in job_context(str(job.id)).items() if v is not None}


def job_finished(job: Any, values: dict) -> None:
    """Count, time and log a prediction job whose outcome was just written."""
    from celery import current_task

    status = values["status"].value
    error = values.get("error") or {}
    queue_s = job.queue_ms / 1000 if job.queue_ms is not None else None
    # the job's total is submit -> now: its queue time plus how long this task has run since
    elapsed = task_elapsed(current_task.request.id if current_task else None)
    total_s = queue_s + elapsed if queue_s is not None and elapsed is not None else None
    load_s = values["load_ms"] / 1000 if values.get("load_ms") is not None else None
    inference_s = values["inference_ms"] / 1000 if values.get("inference_ms") is not None else None
    metrics.record_job(job.model_version_id, status, error.get("code"), queue_s, load_s, inference_s, total_s)
    log.info("job finished", extra={
        **_own_context(job), "job_id": str(job.id), "model_id": str(job.model_version_id), "status": status,
        "error_code": error.get("code"), "cache_hit": values.get("cache_hit"), "attempt": job.attempts,
        "queue_ms": job.queue_ms, "load_ms": values.get("load_ms"), "inference_ms": values.get("inference_ms")})


def model_loaded(lookup: Any) -> None:
    """Observe a model load (a cache miss)."""
    if not lookup.hit:
        metrics.record_model_load(lookup.load_seconds)


@worker_process_shutdown.connect
def _process_gone(pid: int | None = None, **_kwargs: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics.forget_process(pid or os.getpid())


before_task_publish.connect(attach_context_to_message)
