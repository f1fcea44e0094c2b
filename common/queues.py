"""Task names, queues and the Celery configuration both the web and the workers use."""
from __future__ import annotations

import json
from datetime import datetime

import kombu.exceptions
import redis
from celery import Celery
from kombu import Exchange, Queue

from common.broker import use_inferq_redis_transport
from common.config import Settings

PREDICTIONS_QUEUE = "predictions"
BATCHES_QUEUE = "batches"
MAINTENANCE_QUEUE = "maintenance"

RUN_PREDICTION = "inferq.predictions.run"
PLAN_BATCH = "inferq.batches.plan"
SCORE_CHUNK = "inferq.batches.score_chunk"
FINISH_BATCH = "inferq.batches.finish"
RECONCILE_JOBS = "inferq.maintenance.reconcile_jobs"
PURGE_RESULTS = "inferq.maintenance.purge_results"

TASK_ROUTES = {
    RUN_PREDICTION: {"queue": PREDICTIONS_QUEUE},
    PLAN_BATCH: {"queue": BATCHES_QUEUE},
    SCORE_CHUNK: {"queue": BATCHES_QUEUE},
    FINISH_BATCH: {"queue": BATCHES_QUEUE},
    RECONCILE_JOBS: {"queue": MAINTENANCE_QUEUE},
    PURGE_RESULTS: {"queue": MAINTENANCE_QUEUE},
}
ALL_QUEUES = (PREDICTIONS_QUEUE, BATCHES_QUEUE, MAINTENANCE_QUEUE)
# what publishing raises while the broker is unreachable
BROKER_ERRORS = (OSError, redis.RedisError, kombu.exceptions.OperationalError)
# The default (nameless) exchange routes by queue name alone, so publishing keeps working after
# Redis loses kombu's binding tables (a restart without persistence, a FLUSHDB).
TASK_QUEUES = [Queue(name, Exchange("", type="direct"), routing_key=name) for name in ALL_QUEUES]


def celery_config(settings: Settings) -> dict:
    """JSON only, late acks, one message prefetched: a killed worker loses no job."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_hard_time_limit,
        "task_queues": TASK_QUEUES,
        "task_routes": TASK_ROUTES,
        # staging or assembling a large file takes longer than one prediction may
        "task_annotations": {name: {"soft_time_limit": settings.batch_task_time_limit,
                                    "time_limit": settings.batch_task_time_limit + 30}
                             for name in (PLAN_BATCH, SCORE_CHUNK, FINISH_BATCH)},
        "task_default_queue": PREDICTIONS_QUEUE,
        # task events cost a Redis publish per task; Flower switches them on while it runs
        "worker_send_task_events": False,
        "beat_schedule": {
            "reconcile-jobs": {"task": RECONCILE_JOBS, "schedule": settings.reconcile_interval_seconds},
            "purge-results": {"task": PURGE_RESULTS, "schedule": 3600.0},
        },
    }


def create_celery(settings: Settings, name: str = "inferq") -> Celery:
    use_inferq_redis_transport()
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


# While a RUN_PREDICTION message for a model waits in the queue, the worker that takes it will claim the
# model's other queued jobs too (adaptive batching): a job submitted meanwhile needs no message of its own.
# The mark expires, so a message lost with the mark still set (Redis failing between the two commands)
# delays the model's next jobs by at most this long; the reconciler stays the backstop.
RUN_PENDING_TTL_MS = 2000


# A job of an idle model with at most this many values (rows x features) carries them in its message, a few
# kB of JSON at most: its worker scores them while its claim is in flight instead of reading them back.
MESSAGE_ROWS_MAX_VALUES = 1024


def run_pending_key(model_id: str) -> str:
    return f"inferq:run-pending:{model_id}"


def mark_run_pending(client: redis.Redis, model_id: str) -> bool:
    """True when no message for the model was waiting, so the caller must publish one (now marked)."""
    return bool(client.set(run_pending_key(model_id), 1, nx=True, px=RUN_PENDING_TTL_MS))


def clear_run_pending(client: redis.Redis, model_id: str) -> None:
    """The model's waiting message is being taken: jobs committed from now on need a message again."""
    client.delete(run_pending_key(model_id))


# a larger job-done message carries only the status: its waiters read the job from PostgreSQL
JOB_DONE_MAX_BYTES = 64 * 1024
# what a job-done message copies from the finished row (prediction_jobs columns)
JOB_DONE_FIELDS = ("status", "result", "error", "cache_hit", "load_ms", "inference_ms", "attempts", "worker",
                   "started_at", "finished_at", "queue_ms", "total_ms")
_TIMES = ("started_at", "finished_at")


def job_done_message(row: dict, batch_size: int = 1) -> str:
    """A job's end as announced on its list: a copy of the row the worker just committed (the row stays
    the source of truth), so a waiting request need not read it back; only the status when it is large. Both
    say how many jobs the worker recorded in the same statement: more than one had queued up (a sign of load
    that every web process hears, web/job_waiter.py)."""
    message = json.dumps({**{key: row.get(key) for key in JOB_DONE_FIELDS}, "batch_size": batch_size},
                         default=datetime.isoformat)
    if len(message) <= JOB_DONE_MAX_BYTES:
        return message
    return json.dumps({"status": row["status"], "batch_size": batch_size})


# How long a job's end stays readable in Redis: a waiter reads it within moments (it starts waiting right after
# submitting, or right after reading the row unfinished); the row stays the source of truth after that.
JOB_DONE_TTL_SECONDS = 10


def job_done_key(job_id: str) -> str:
    """The Redis list that holds a job's end (its job-done message) for JOB_DONE_TTL_SECONDS; `?wait` blocks on
    it (web/job_waiter.py)."""
    return f"inferq:job-done:{job_id}"


def announce_job_done(pipe: redis.client.Pipeline, job_id: str, row: dict, batch_size: int = 1) -> None:
    """Queue on `pipe` the commands that announce a job's end: its job-done message on its list, which expires."""
    key = job_done_key(job_id)
    pipe.lpush(key, job_done_message(row, batch_size))
    pipe.expire(key, JOB_DONE_TTL_SECONDS)


def read_job_done(message: bytes | str) -> tuple[dict | None, int]:
    """The announced copy of the row, times as datetimes (None when the message carries only the status), and
    how many jobs were recorded with it."""
    announced = json.loads(message)
    if not isinstance(announced, dict):
        return None, 1
    batch_size = announced.get("batch_size")
    batch_size = batch_size if isinstance(batch_size, int) and batch_size > 0 else 1
    if not set(JOB_DONE_FIELDS) <= set(announced):
        return None, batch_size
    fields = {key: announced[key] for key in JOB_DONE_FIELDS}
    return {**fields, **{key: datetime.fromisoformat(fields[key]) for key in _TIMES if fields[key]}}, batch_size
