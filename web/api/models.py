"""The model registry: upload, list, read, update, archive, and aliases."""
from __future__ import annotations

import re
import uuid
from pathlib import PurePath

import marshmallow as ma
from flask import current_app, request
from flask.views import MethodView
from flask_smorest.fields import Upload
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from common.artifacts import SUPPORTED_EXTENSIONS, ArtifactRejected, SandboxLimits, validate_upload
from common.extensions import db
from common.models import ModelAlias, ModelStatus, ModelVersion, utcnow
from common.storage import UploadTooLarge
from web.errors import ApiError, not_found
from web.multipart import Blueprint
from web.pagination import PageQuerySchema, page_schema, paginate
from web.registry import (
    ALIAS_PATTERN, NAME_PATTERN, RESERVED_ALIASES, artifact_store, create_version, get_version, resolve_reference,
)
from web.security import auth_required, current_user

blp = Blueprint("models", __name__, description="Versioned scikit-learn models")

STATUSES = [s.value for s in ModelStatus]
Tags = ma.fields.List(ma.fields.String(validate=ma.validate.Length(min=1, max=50)), validate=ma.validate.Length(max=20))


class UploadSchema(ma.Schema):
    file = Upload(required=True, metadata={"description": ".skops, .joblib, .pkl or .pickle"})
    name = ma.fields.String(required=True, validate=ma.validate.Regexp(
        NAME_PATTERN, error="name must be 1-100 characters of A-Z a-z 0-9 . _ - and start with a letter or digit"))
    description = ma.fields.String(load_default="", validate=ma.validate.Length(max=2000))
    tags = ma.fields.String(load_default="", metadata={"description": "comma-separated tags"})


class ModelVersionSchema(ma.Schema):
    id = ma.fields.UUID()
    name = ma.fields.String()
    version = ma.fields.Integer()
    reference = ma.fields.Function(lambda m: f"{m.name}@v{m.version}")
    description = ma.fields.String()
    tags = ma.fields.List(ma.fields.String())
    status = ma.fields.Function(lambda m: m.status.value)
    estimator_class = ma.fields.String()
    task_kind = ma.fields.String()
    n_features_in = ma.fields.Integer(allow_none=True)
    feature_names = ma.fields.List(ma.fields.String(), allow_none=True)
    feature_kinds = ma.fields.List(ma.fields.String(), allow_none=True)
    classes = ma.fields.List(ma.fields.Raw(), allow_none=True)
    has_predict_proba = ma.fields.Boolean()
    sklearn_version = ma.fields.String()
    upload_format = ma.fields.String()
    upload_sha256 = ma.fields.String()
    upload_size = ma.fields.Integer()
    artifact_sha256 = ma.fields.String()
    artifact_size = ma.fields.Integer()
    created_at = ma.fields.DateTime()
    updated_at = ma.fields.DateTime()


ModelPageSchema = page_schema(ModelVersionSchema)


class ModelQuerySchema(PageQuerySchema):
    name = ma.fields.String(validate=ma.validate.Length(max=100))
    status = ma.fields.String(validate=ma.validate.OneOf(STATUSES))


class ModelPatchSchema(ma.Schema):
    description = ma.fields.String(validate=ma.validate.Length(max=2000))
    tags = Tags
    status = ma.fields.String(validate=ma.validate.OneOf(STATUSES))


class AliasSetSchema(ma.Schema):
    version = ma.fields.Integer(required=True, validate=ma.validate.Range(min=1, max=2**31 - 1))


class AliasSchema(ma.Schema):
    alias = ma.fields.String()
    name = ma.fields.String()
    version = ma.fields.Integer()
    model_id = ma.fields.UUID()
    updated_at = ma.fields.DateTime()


def _parse_tags(raw: str) -> list[str]:
    tags = [t.strip() for t in raw.split(",") if t.strip()]
    if len(tags) > 20 or any(len(t) > 50 for t in tags):
        raise ApiError(422, "validation_error", "tags: at most 20 tags of at most 50 characters")
    return tags


def _format_of(filename: str) -> str:
    suffix = PurePath(filename or "").suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise ApiError(422, "unsupported_format",
                       f"Unsupported model file {suffix or '(no extension)'}: upload .skops, .joblib, .pkl or .pickle")
    return suffix


def _sandbox_limits() -> SandboxLimits:
    settings = current_app.extensions["settings"]
    return SandboxLimits(memory_bytes=settings.sandbox_memory_mb * 1024 * 1024,
                         cpu_seconds=settings.sandbox_cpu_seconds, wall_seconds=settings.sandbox_wall_seconds)


@blp.before_request
def allow_large_uploads() -> None:
    if request.endpoint == "models.upload":
        request.max_content_length = current_app.extensions["settings"].max_model_bytes + 64 * 1024


@blp.route("/upload", methods=["POST"])
@blp.arguments(UploadSchema, location="form_and_files")
@blp.response(201, ModelVersionSchema)
@auth_required
def upload(form: dict):
    """Upload a model; it is validated in a sandbox and stored as a new immutable version."""
    file = form["file"]
    _format_of(file.filename)
    limit = current_app.extensions["settings"].max_model_bytes
    try:
        with artifact_store().spooled_upload(file.stream, limit) as stored:
            if stored.size == 0:
                raise ApiError(422, "invalid_model", "The uploaded file is empty")
            artifact = validate_upload(stored.path, file.filename, _sandbox_limits())
            return create_version(current_user().id, form["name"], form["description"],
                                  _parse_tags(form["tags"]), stored, artifact)
    except UploadTooLarge:
        raise ApiError(413, "payload_too_large", f"The model file is larger than {limit} bytes") from None
    except ArtifactRejected as exc:
        raise ApiError(422, "invalid_model", f"Model rejected: {exc}") from None


@blp.route("")
class Models(MethodView):
    @blp.arguments(ModelQuerySchema, location="query")
    @blp.response(200, ModelPageSchema)
    @auth_required
    def get(self, query: dict):
        """List your models, newest first."""
        filters = [ModelVersion.owner_id == current_user().id]
        if query.get("name"):
            filters.append(ModelVersion.name == query["name"])
        if query.get("status"):
            filters.append(ModelVersion.status == ModelStatus(query["status"]))
        return paginate(ModelVersion, filters, [ModelVersion.created_at.desc(), ModelVersion.version.desc()], query)


@blp.route("/<uuid:model_id>")
class ModelDetail(MethodView):
    @blp.response(200, ModelVersionSchema)
    @auth_required
    def get(self, model_id: uuid.UUID):
        """One model version."""
        return get_version(current_user().id, model_id)

    @blp.arguments(ModelPatchSchema, required=False)  # no body changes nothing
    @blp.response(200, ModelVersionSchema)
    @blp.alt_response(409, description="The model is archived: it can no longer change")
    @auth_required
    def patch(self, changes: dict, model_id: uuid.UUID):
        """Change description, tags or status; archived is final."""
        model = get_version(current_user().id, model_id)
        if model.status == ModelStatus.archived and changes:
            raise ApiError(409, "model_archived", "An archived model cannot be changed")
        for key, value in changes.items():
            setattr(model, key, ModelStatus(value) if key == "status" else value)
        db.session.commit()
        return model

    @blp.response(204)
    @auth_required
    def delete(self, model_id: uuid.UUID):
        """Archive a model version (soft delete: the artifact stays for audit)."""
        model = get_version(current_user().id, model_id)
        model.status = ModelStatus.archived
        db.session.commit()


def _alias_out(alias: ModelAlias, model: ModelVersion) -> dict:
    return {"alias": alias.alias, "name": alias.name, "version": model.version, "model_id": model.id,
            "updated_at": alias.updated_at}


@blp.route("/by-name/<string:name>/aliases")
class Aliases(MethodView):
    @blp.response(200, AliasSchema(many=True))
    @auth_required
    def get(self, name: str):
        """The aliases of a model name."""
        rows = db.session.execute(
            select(ModelAlias, ModelVersion).join(ModelVersion, ModelAlias.version_id == ModelVersion.id)
            .where(ModelAlias.owner_id == current_user().id, ModelAlias.name == name).order_by(ModelAlias.alias)).all()
        return [_alias_out(alias, model) for alias, model in rows]


@blp.route("/by-name/<string:name>/aliases/<string:alias>")
class AliasDetail(MethodView):
    @blp.arguments(AliasSetSchema)
    @blp.response(200, AliasSchema)
    @auth_required
    def put(self, data: dict, name: str, alias: str):
        """Point an alias (e.g. `production`) at a version of this model name."""
        if not re.fullmatch(ALIAS_PATTERN, alias) or RESERVED_ALIASES.match(alias):
            raise ApiError(422, "invalid_alias", "alias must be 1-64 letters, digits, _ or -, start with a letter, "
                           "and not be 'latest' or look like a version (v3)")
        model = resolve_reference(current_user().id, f"{name}@v{data['version']}")
        stmt = insert(ModelAlias).values(owner_id=current_user().id, name=name, alias=alias, version_id=model.id,
                                         updated_at=utcnow())
        stmt = stmt.on_conflict_do_update(index_elements=["owner_id", "name", "alias"],
                                          set_={"version_id": model.id, "updated_at": utcnow()})
        db.session.execute(stmt)
        db.session.commit()
        return _alias_out(db.session.get(ModelAlias, (current_user().id, name, alias)), model)

    @blp.response(204)
    @auth_required
    def delete(self, name: str, alias: str):
        """Remove an alias."""
        row = db.session.get(ModelAlias, (current_user().id, name, alias))
        if row is None:
            raise not_found("Alias")
        db.session.delete(row)
        db.session.commit()
