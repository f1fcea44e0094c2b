"""Batch scoring: upload a CSV/JSON Lines/Parquet file, follow its progress, download it scored."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import marshmallow as ma
from flask import current_app, request, send_file, url_for
from flask.views import MethodView
from flask_smorest.fields import Upload
from sqlalchemy import func, update

from common.extensions import db
from common.logging import log_context
from common.models import BatchJob, JobStatus
from common.queues import PLAN_BATCH
from common.storage import UploadTooLarge
from common.table_output import assemble
from common.tabular import FORMATS, TabularError, detect_format, read_columns
from web.errors import ApiError, not_found
from web.multipart import Blueprint
from web.pagination import PageQuerySchema, page_schema, paginate
from web.observability import request_id
from web.publishing import publish
from web.registry import artifact_store, require_servable, resolve_reference
from web.security import auth_required, current_user

blp = Blueprint("batches", __name__, description="Batch scoring of uploaded files")
LIVE = (JobStatus.queued, JobStatus.running)
MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


class BatchCreateSchema(ma.Schema):
    file = Upload(required=True, metadata={"description": "CSV with a header row, JSON Lines or Parquet"})
    model = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=200),
                             metadata={"description": "model id or reference (name@alias, name@v3, name@latest)"})
    include_input = ma.fields.Boolean(load_default=False, metadata={"description": "append predictions to the input columns"})
    probabilities = ma.fields.Boolean(load_default=True, metadata={"description": "one proba_<class> column per class"})
    id_column = ma.fields.String(load_default=None, validate=ma.validate.Length(min=1, max=200))
    error_policy = ma.fields.String(load_default="skip", validate=ma.validate.OneOf(["skip", "fail_fast"]))


class ResultQuerySchema(ma.Schema):
    format = ma.fields.String(validate=ma.validate.OneOf(FORMATS))


def _percent(b: BatchJob) -> float:
    return round(min(100.0, 100.0 * b.rows_done / b.rows_total), 2) if b.rows_total else 0.0


def _eta_seconds(b: BatchJob) -> float | None:
    if b.status != JobStatus.running or not b.rows_done or not b.rows_total or not b.started_at:
        return None
    elapsed = (datetime.now(timezone.utc) - b.started_at).total_seconds()
    return round(elapsed / b.rows_done * (b.rows_total - b.rows_done), 1)


class BatchSchema(ma.Schema):
    id = ma.fields.UUID()
    model_id = ma.fields.UUID(attribute="model_version_id")
    status = ma.fields.Function(lambda b: b.status.value)
    input_format = ma.fields.String()
    options = ma.fields.Dict()
    rows_total = ma.fields.Integer(allow_none=True)
    rows_done = ma.fields.Integer()
    rows_failed = ma.fields.Integer()
    chunks_total = ma.fields.Integer(allow_none=True)
    chunks_done = ma.fields.Integer()
    percent = ma.fields.Function(_percent)
    eta_seconds = ma.fields.Function(_eta_seconds, allow_none=True)
    row_errors = ma.fields.List(ma.fields.Dict())
    error = ma.fields.Dict(allow_none=True)
    url = ma.fields.Function(lambda b: url_for("batches.BatchDetail", batch_id=b.id))
    result_url = ma.fields.Function(lambda b: url_for("batches.result", batch_id=b.id))
    created_at = ma.fields.DateTime()
    started_at = ma.fields.DateTime(allow_none=True)
    finished_at = ma.fields.DateTime(allow_none=True)


BatchPageSchema = page_schema(BatchSchema)


@blp.before_request
def allow_large_uploads() -> None:
    if request.endpoint == "batches.Batches":
        request.max_content_length = current_app.extensions["settings"].max_batch_bytes + 1024 * 1024


def _get_batch(batch_id: uuid.UUID) -> BatchJob:
    batch = db.session.get(BatchJob, batch_id)
    if batch is None or batch.owner_id != current_user().id:
        raise not_found("Batch")
    return batch


def _check_columns(model, columns: list[str], id_column: str | None) -> None:
    """The model's features (and the id column) are in the file: 422 listing what is missing."""
    if id_column and id_column not in columns:
        raise ApiError(422, "missing_columns", f"The id column {id_column!r} is not in the file",
                       {"missing": [id_column]})
    if model.feature_names:
        missing = [name for name in model.feature_names if name not in columns]
        if missing:
            raise ApiError(422, "missing_columns", f"The file lacks {len(missing)} column(s) the model needs: "
                           + ", ".join(missing[:20]), {"missing": missing})
    elif model.n_features_in and len([c for c in columns if c != id_column]) < model.n_features_in:
        raise ApiError(422, "missing_columns", f"The model needs {model.n_features_in} feature columns; "
                       f"the file has {len(columns)}")


def _store_input(form: dict, model, batch_id: uuid.UUID) -> tuple[str, str, int]:
    """Stream the upload into the artifact store, check it cheaply; (relative path, format, size)."""
    store, limit = artifact_store(), current_app.extensions["settings"].max_batch_bytes
    try:
        with store.spooled_upload(form["file"].stream, limit) as stored:
            if stored.size == 0:
                raise ApiError(422, "invalid_input", "The file is empty")
            fmt = detect_format(stored.path, form["file"].filename)
            _check_columns(model, read_columns(stored.path, fmt), form["id_column"])
            relative = f"{store.batch_dir(current_user().id, batch_id)}/input.{fmt}"
            store.keep(stored.path, relative)
            return relative, fmt, stored.size
    except UploadTooLarge:
        raise ApiError(413, "payload_too_large", f"The file is larger than {limit} bytes") from None
    except TabularError as exc:
        raise ApiError(422, "invalid_input", str(exc)) from None


@blp.route("")
class Batches(MethodView):
    @blp.arguments(BatchCreateSchema, location="form_and_files")
    @blp.response(202, BatchSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(409, description="The model is archived")
    @auth_required
    def post(self, form: dict):
        """Upload a file to score; columns are checked before anything is queued."""
        model = resolve_reference(current_user().id, form["model"])
        require_servable(model)
        batch_id = uuid.uuid4()
        relative, fmt, size = _store_input(form, model, batch_id)
        options = {k: form[k] for k in ("include_input", "probabilities", "id_column", "error_policy")}
        batch = BatchJob(id=batch_id, owner_id=current_user().id, model_version_id=model.id, input_format=fmt,
                         input_path=relative, input_size=size, options=options,
                         request_id=request_id())
        db.session.add(batch)
        db.session.commit()
        with log_context(batch_id=str(batch.id), model_id=str(batch.model_version_id)):
            publish(PLAN_BATCH, str(batch.id))
        return batch

    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, BatchPageSchema)
    @auth_required
    def get(self, query: dict):
        """List your batches, newest first."""
        return paginate(BatchJob, [BatchJob.owner_id == current_user().id], [BatchJob.created_at.desc()], query)


@blp.route("/<uuid:batch_id>")
class BatchDetail(MethodView):
    @blp.response(200, BatchSchema)
    @auth_required
    def get(self, batch_id: uuid.UUID):
        """A batch's status and progress, with the first row errors."""
        return _get_batch(batch_id)

    @blp.response(200, BatchSchema)
    @blp.alt_response(409, description="The batch has already ended")
    @auth_required
    def delete(self, batch_id: uuid.UUID):
        """Cancel a batch: chunks not started never run."""
        batch = _get_batch(batch_id)
        cancelled = db.session.execute(update(BatchJob).where(BatchJob.id == batch.id, BatchJob.status.in_(LIVE))
                                       .values(status=JobStatus.cancelled, finished_at=func.clock_timestamp())).rowcount
        db.session.commit()
        db.session.refresh(batch)
        if not cancelled:
            raise ApiError(409, "not_cancellable", f"The batch is {batch.status.value} and can no longer be cancelled")
        return batch


def _result_file(batch: BatchJob, fmt: str) -> Path:
    """The result in `fmt`; another format than the input's is assembled once from the chunk outputs."""
    store = artifact_store()
    if fmt == batch.input_format:
        return store.path(batch.result_path)
    target = store.path(f"{store.batch_dir(batch.owner_id, batch.id)}/result.{fmt}")
    if not target.exists():
        chunks = [store.path(store.batch_chunk(batch.owner_id, batch.id, i)) for i in range(batch.chunks_total)]
        assemble(chunks, target, fmt)
    return target


@blp.route("/<uuid:batch_id>/result", methods=["GET"])
@blp.arguments(ResultQuerySchema, location="query")
@blp.response(200, description="The scored file", content_type="application/octet-stream")
@blp.alt_response(409, description="The batch has not finished")
@auth_required
def result(query: dict, batch_id: uuid.UUID):
    """Download the scored file, rows in their original order (`format` converts it)."""
    batch = _get_batch(batch_id)
    if batch.status != JobStatus.succeeded:
        raise ApiError(409, "not_ready", f"The batch is {batch.status.value} ({_percent(batch)}% done)",
                       {"status": batch.status.value, "rows_done": batch.rows_done, "rows_total": batch.rows_total,
                        "percent": _percent(batch)})
    fmt = query.get("format", batch.input_format)
    return send_file(_result_file(batch, fmt), mimetype=MEDIA_TYPES[fmt], as_attachment=True,
                     download_name=f"{batch.id}.{fmt}")
