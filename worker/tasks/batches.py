"""Batch scoring: a planner splits the upload into chunks, chunk tasks score them on every worker,
and the chunk that completes the set triggers assembly. PostgreSQL counts what is done, once per chunk."""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

from celery import current_app, shared_task
from sqlalchemy import cast, func, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH

from common.models import BatchChunk, BatchJob, JobStatus
from common.queues import FINISH_BATCH, PLAN_BATCH, SCORE_CHUNK
from common.tabular import TabularError
from worker import runtime
from worker.batch_io import BatchOptions, ChunkResult, ChunkSpec, RowFailure, assemble, plan_chunks, score_chunk
from worker.metrics import record_batch_rows
from worker.serving import load_model, model_info

log = logging.getLogger(__name__)
MAX_ROW_ERRORS = 20
LIVE = (JobStatus.queued, JobStatus.running)


def _batch(batch_id: uuid.UUID) -> BatchJob | None:
    with runtime.session() as s:
        return s.get(BatchJob, batch_id)


def _batch_dir(batch: BatchJob) -> Path:
    return runtime.artifact_store().path(runtime.artifact_store().batch_dir(batch.owner_id, batch.id))


def _fail(batch_id: uuid.UUID, code: str, message: str, details: dict | None = None) -> None:
    with runtime.session() as s:
        s.execute(update(BatchJob).where(BatchJob.id == batch_id, BatchJob.status.in_(LIVE)).values(
            status=JobStatus.failed, finished_at=func.clock_timestamp(),
            error={"code": code, "message": message, "details": details or {}}))
        s.commit()


def _dispatch(batch_id: uuid.UUID, indexes: list[int]) -> None:
    for index in indexes:
        current_app.send_task(SCORE_CHUNK, args=[str(batch_id), index])


def _record_plan(batch_id: uuid.UUID, rows_total: int, chunks: list[ChunkSpec]) -> None:
    with runtime.session() as s:
        s.add_all(BatchChunk(batch_id=batch_id, index=c.index, spec=c.to_dict()) for c in chunks)
        s.execute(update(BatchJob).where(BatchJob.id == batch_id).values(
            rows_total=rows_total, chunks_total=len(chunks)))
        s.commit()


def _unfinished_chunks(batch_id: uuid.UUID) -> list[int]:
    with runtime.session() as s:
        return list(s.scalars(select(BatchChunk.index).where(
            BatchChunk.batch_id == batch_id, BatchChunk.status != JobStatus.succeeded).order_by(BatchChunk.index)))


@shared_task(name=PLAN_BATCH)
def plan_batch(batch_id: str) -> None:
    """Stage the upload, record its chunks and fan them out; a re-run re-dispatches unfinished chunks."""
    batch_uuid = uuid.UUID(batch_id)
    with runtime.session() as s:
        s.execute(update(BatchJob).where(BatchJob.id == batch_uuid, BatchJob.status == JobStatus.queued).values(
            status=JobStatus.running, started_at=func.clock_timestamp(), attempts=BatchJob.attempts + 1))
        s.commit()
    batch = _batch(batch_uuid)
    if batch is None or batch.status != JobStatus.running:
        return
    if batch.chunks_total is None:
        options = BatchOptions.from_dict(batch.options)
        try:
            rows_total, chunks = plan_chunks(runtime.artifact_store().path(batch.input_path), batch.input_format,
                                             runtime.settings().batch_rows_per_chunk, _batch_dir(batch),
                                             id_column=options.id_column)
        except TabularError as exc:
            return _fail(batch_uuid, "invalid_input", str(exc))
        _record_plan(batch_uuid, rows_total, chunks)
    _dispatch(batch_uuid, _unfinished_chunks(batch_uuid))


def _chunk_output(batch: BatchJob, index: int) -> Path:
    return runtime.artifact_store().path(runtime.artifact_store().batch_chunk(batch.owner_id, batch.id, index))


def _score(batch: BatchJob, chunk: BatchChunk) -> ChunkResult:
    info = model_info(batch.model_version_id)
    model = load_model(info).model
    out = _chunk_output(batch, chunk.index)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = ChunkSpec.from_dict(chunk.spec)
    return score_chunk(Path(spec.staged), spec, model, list(info.feature_names) if info.feature_names else None,
                       info.n_features_in, list(info.classes) if info.classes else None,
                       BatchOptions.from_dict(batch.options), out)


def _record_chunk(batch: BatchJob, index: int, result: ChunkResult) -> bool:
    """Count a finished chunk exactly once; True when it was the last one."""
    new_errors = [e.to_dict() for e in result.errors]
    with runtime.session() as s:
        first_time = s.execute(update(BatchChunk).where(
            BatchChunk.batch_id == batch.id, BatchChunk.index == index, BatchChunk.status != JobStatus.succeeded)
            .values(status=JobStatus.succeeded, rows_done=result.rows, rows_failed=result.rows_failed,
                    output_path=str(_chunk_output(batch, index)))).rowcount
        if not first_time:
            return False
        row = s.execute(update(BatchJob).where(BatchJob.id == batch.id).values(
            rows_done=BatchJob.rows_done + result.rows, rows_failed=BatchJob.rows_failed + result.rows_failed,
            chunks_done=BatchJob.chunks_done + 1,
            row_errors=func.jsonb_path_query_array(
                BatchJob.row_errors.op("||")(literal(new_errors, JSONB)),
                cast(f"$[0 to {MAX_ROW_ERRORS - 1}]", JSONPATH)))
            .returning(BatchJob.chunks_done, BatchJob.chunks_total)).one()
        s.commit()
    record_batch_rows(batch.model_version_id, result.rows - result.rows_failed, result.rows_failed)
    return row.chunks_done == row.chunks_total


@shared_task(name=SCORE_CHUNK)
def score_batch_chunk(batch_id: str, index: int) -> None:
    """Score one chunk; re-running it (a killed worker, a duplicate message) overwrites its output and counts once."""
    batch_uuid = uuid.UUID(batch_id)
    batch = _batch(batch_uuid)
    if batch is None or batch.status != JobStatus.running:
        return  # cancelled or failed: chunks not started never run
    with runtime.session() as s:
        chunk = s.get(BatchChunk, (batch_uuid, index))
        if chunk is None or chunk.status == JobStatus.succeeded:
            return
        chunk.status, chunk.attempts = JobStatus.running, chunk.attempts + 1
        s.commit()
    cap = runtime.settings().job_max_attempts
    if chunk.attempts > cap:
        return _fail(batch_uuid, "attempts_exhausted", f"Chunk {index} did not complete in {cap} attempts")
    try:
        result = _score(batch, chunk)
    except RowFailure as exc:
        return _fail(batch_uuid, "row_error", f"Stopped at the first bad row: {exc}",
                     {"row": exc.row, "column": exc.column, "reason": exc.reason})
    except (TabularError, ValueError) as exc:  # the model or the data refused the chunk as a whole
        return _fail(batch_uuid, "chunk_error", f"Chunk {index} could not be scored: {exc}"[:1000])
    if _record_chunk(batch, index, result):
        current_app.send_task(FINISH_BATCH, args=[batch_id])


@shared_task(name=FINISH_BATCH)
def finish_batch(batch_id: str) -> None:
    """Assemble the chunk outputs in order into the result file, in the input's format."""
    batch = _batch(uuid.UUID(batch_id))
    if batch is None or batch.status != JobStatus.running:
        return
    store = runtime.artifact_store()
    relative = f"{store.batch_dir(batch.owner_id, batch.id)}/result.{batch.input_format}"
    outputs = [_chunk_output(batch, i) for i in range(batch.chunks_total)]
    assemble(outputs, store.path(relative), batch.input_format)
    with runtime.session() as s:
        s.execute(update(BatchJob).where(BatchJob.id == batch.id, BatchJob.status == JobStatus.running).values(
            status=JobStatus.succeeded, result_path=relative, finished_at=func.clock_timestamp()))
        s.commit()
