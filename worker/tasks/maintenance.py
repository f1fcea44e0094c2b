"""Beat tasks: recover jobs and batches whose message or worker was lost, and purge old results."""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import current_app, shared_task
from sqlalchemy import delete, func, select, update

from common.models import FINAL_STATUSES, BatchChunk, BatchJob, JobStatus, PredictionJob
from common.queues import FINISH_BATCH, PLAN_BATCH, PURGE_RESULTS, RECONCILE_JOBS, RUN_PREDICTION, SCORE_CHUNK
from worker import runtime

log = logging.getLogger(__name__)
RECONCILE_BATCH = 1000


def _lost_running_jobs(s) -> list:
    """Running past the hard time limit: their worker died or vanished with the message."""
    grace = timedelta(seconds=runtime.settings().job_hard_time_limit + 30)
    return s.execute(select(PredictionJob.id, PredictionJob.attempts).where(
        PredictionJob.status == JobStatus.running, PredictionJob.started_at < func.now() - grace)
        .limit(RECONCILE_BATCH).with_for_update(skip_locked=True)).all()


def _requeue_lost(s) -> int:
    cap = runtime.settings().job_max_attempts
    lost = _lost_running_jobs(s)
    exhausted = [job.id for job in lost if job.attempts >= cap]
    if exhausted:
        s.execute(update(PredictionJob).where(PredictionJob.id.in_(exhausted)).values(
            status=JobStatus.failed, finished_at=func.clock_timestamp(),
            total_ms=func.extract("epoch", func.clock_timestamp() - PredictionJob.created_at) * 1000,
            error={"code": "attempts_exhausted",
                   "message": f"The job did not complete in {cap} attempts (its worker was lost each time)"}))
    retry = [job.id for job in lost if job.attempts < cap]
    if retry:
        s.execute(update(PredictionJob).where(PredictionJob.id.in_(retry))
                  .values(status=JobStatus.queued, worker=None))
    return len(lost)


def _stale_queued(s) -> list:
    """Queued longer than the deadline: the message may be gone (Redis flushed or restarted)."""
    deadline = timedelta(seconds=runtime.settings().job_stuck_seconds)
    return list(s.scalars(select(PredictionJob.id).where(
        PredictionJob.status == JobStatus.queued, PredictionJob.created_at < func.now() - deadline)
        .order_by(PredictionJob.created_at).limit(RECONCILE_BATCH)))


def _stalled_batches(s) -> list[tuple[str, list]]:
    """Batch messages to send again: plans, chunks and assemblies that made no progress past the deadline."""
    stuck = func.now() - timedelta(seconds=runtime.settings().job_stuck_seconds)
    plan_lost = func.now() - timedelta(seconds=runtime.settings().batch_task_time_limit + 60)
    plans = s.scalars(select(BatchJob.id).where(
        ((BatchJob.status == JobStatus.queued) & (BatchJob.created_at < stuck))
        | ((BatchJob.status == JobStatus.running) & BatchJob.chunks_total.is_(None) & (BatchJob.started_at < plan_lost))))
    chunks = s.execute(select(BatchChunk.batch_id, BatchChunk.index).join(BatchJob).where(
        BatchJob.status == JobStatus.running, BatchChunk.status != JobStatus.succeeded,
        BatchChunk.updated_at < stuck).limit(RECONCILE_BATCH))
    finishes = s.scalars(select(BatchJob.id).where(
        BatchJob.status == JobStatus.running, BatchJob.chunks_done == BatchJob.chunks_total,
        BatchJob.started_at < stuck))
    return ([(PLAN_BATCH, [str(b)]) for b in plans] + [(SCORE_CHUNK, [str(b), i]) for b, i in chunks]
            + [(FINISH_BATCH, [str(b)]) for b in finishes])


@shared_task(name=RECONCILE_JOBS)
def reconcile_jobs() -> dict:
    """Re-enqueue stuck jobs and batch steps; duplicates are harmless: every step is claimed or counted once."""
    with runtime.session() as s:
        lost = _requeue_lost(s)
        s.commit()
        stale = _stale_queued(s)
        batch_steps = _stalled_batches(s)
    for job_id in stale:
        current_app.send_task(RUN_PREDICTION, args=[str(job_id)])
    for task, args in batch_steps:
        current_app.send_task(task, args=args)
    if lost or stale or batch_steps:
        log.info("reconciled", extra={"requeued_lost": lost, "republished": len(stale),
                                      "batch_steps": len(batch_steps)})
    return {"lost": lost, "republished": len(stale), "batch_steps": len(batch_steps)}


@shared_task(name=PURGE_RESULTS)
def purge_results() -> dict:
    """Delete finished jobs and batches (with their files) older than RESULT_RETENTION_DAYS."""
    cutoff = func.now() - timedelta(days=runtime.settings().result_retention_days)
    store = runtime.artifact_store()
    with runtime.session() as s:
        jobs = s.execute(delete(PredictionJob).where(
            PredictionJob.status.in_(FINAL_STATUSES), PredictionJob.finished_at < cutoff)).rowcount
        batches = s.execute(delete(BatchJob).where(BatchJob.status.in_(FINAL_STATUSES), BatchJob.finished_at < cutoff)
                            .returning(BatchJob.owner_id, BatchJob.id)).all()
        s.commit()
    for owner_id, batch_id in batches:
        store.remove_tree(store.batch_dir(owner_id, batch_id))
    return {"jobs": jobs, "batches": len(batches)}
