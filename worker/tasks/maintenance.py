"""Beat tasks: recover jobs whose message or worker was lost, and purge old results."""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import current_app, shared_task
from sqlalchemy import delete, func, select, update

from common.models import FINAL_STATUSES, JobStatus, PredictionJob
from common.queues import PURGE_RESULTS, RECONCILE_JOBS, RUN_PREDICTION
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


@shared_task(name=RECONCILE_JOBS)
def reconcile_jobs() -> dict:
    """Re-enqueue stuck jobs; a duplicate message is harmless because the claim is a compare-and-swap."""
    with runtime.session() as s:
        lost = _requeue_lost(s)
        s.commit()
        stale = _stale_queued(s)
    for job_id in stale:
        current_app.send_task(RUN_PREDICTION, args=[str(job_id)])
    if lost or stale:
        log.info("reconciled jobs", extra={"requeued_lost": lost, "republished": len(stale)})
    return {"lost": lost, "republished": len(stale)}


@shared_task(name=PURGE_RESULTS)
def purge_results() -> int:
    """Delete finished jobs older than RESULT_RETENTION_DAYS."""
    cutoff = func.now() - timedelta(days=runtime.settings().result_retention_days)
    with runtime.session() as s:
        deleted = s.execute(delete(PredictionJob).where(
            PredictionJob.status.in_(FINAL_STATUSES), PredictionJob.finished_at < cutoff)).rowcount
        s.commit()
    return deleted
