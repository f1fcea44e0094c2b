"""Model registry rules: atomic version numbers, stored artifacts, and references like `name@production`."""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

from flask import current_app
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from common.artifacts import ValidatedArtifact
from common.extensions import db
from common.models import ModelAlias, ModelName, ModelStatus, ModelVersion
from common.storage import ArtifactStore, StoredUpload
from web.errors import ApiError, not_found

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
RESERVED_ALIASES = re.compile(r"^(latest|v\d+)$")
ARTIFACT_FILE = "model.skops"


def artifact_store() -> ArtifactStore:
    return current_app.extensions["artifact_store"]


def next_version(owner_id: uuid.UUID, name: str) -> int:
    """Claim the next version number of (owner, name); the row lock serialises concurrent uploads."""
    stmt = insert(ModelName).values(owner_id=owner_id, name=name, last_version=1)
    stmt = stmt.on_conflict_do_update(index_elements=["owner_id", "name"],
                                      set_={"last_version": ModelName.last_version + 1})
    return db.session.execute(stmt.returning(ModelName.last_version)).scalar_one()


def create_version(owner_id: uuid.UUID, name: str, description: str, tags: list[str],
                   upload: StoredUpload, artifact: ValidatedArtifact) -> ModelVersion:
    """Store the validated skops artifact and record the new version, all or nothing."""
    version = next_version(owner_id, name)
    relative = f"{artifact_store().model_dir(owner_id, name, version)}/{ARTIFACT_FILE}"
    path = artifact_store().write_bytes(relative, artifact.skops_bytes)
    meta = artifact.metadata
    row = ModelVersion(
        owner_id=owner_id, name=name, version=version, description=description, tags=tags,
        estimator_class=meta.estimator_class, task_kind=meta.task_kind, n_features_in=meta.n_features_in,
        feature_names=meta.feature_names, feature_kinds=meta.feature_kinds, classes=meta.classes,
        has_predict_proba=meta.has_predict_proba, sklearn_version=meta.sklearn_version,
        upload_format=artifact.upload_format, upload_sha256=upload.sha256, upload_size=upload.size,
        artifact_path=relative, artifact_sha256=hashlib.sha256(artifact.skops_bytes).hexdigest(),
        artifact_size=len(artifact.skops_bytes),
    )
    db.session.add(row)
    try:
        db.session.commit()
    except Exception:
        db.session.rollback()
        path.unlink(missing_ok=True)
        raise
    return row


def get_version(owner_id: uuid.UUID, version_id: uuid.UUID) -> ModelVersion:
    row = db.session.get(ModelVersion, version_id)
    if row is None or row.owner_id != owner_id:
        raise not_found("Model")
    return row


def resolve_reference(owner_id: uuid.UUID, reference: str) -> ModelVersion:
    """A version id, or `name@alias`, `name@v3`, `name@latest` (a bare name means latest)."""
    try:
        return get_version(owner_id, uuid.UUID(reference))
    except ValueError:
        pass
    name, _, selector = reference.partition("@")
    selector = selector or "latest"
    query = select(ModelVersion).where(ModelVersion.owner_id == owner_id, ModelVersion.name == name)
    if selector == "latest":
        query = query.where(ModelVersion.status != ModelStatus.archived).order_by(ModelVersion.version.desc())
    elif re.fullmatch(r"v\d{1,9}", selector):  # a longer number is no version (they are 32-bit integers)
        query = query.where(ModelVersion.version == int(selector[1:]))
    else:
        query = query.join(ModelAlias, ModelAlias.version_id == ModelVersion.id).where(
            ModelAlias.owner_id == owner_id, ModelAlias.name == name, ModelAlias.alias == selector)
    row = db.session.scalars(query.limit(1)).first()
    if row is None:
        raise not_found(f"Model {reference!r}")
    return row


@dataclass(frozen=True)
class InputSchema:
    """What checking a job's input needs of a version: fixed for the version's life."""
    id: uuid.UUID
    owner_id: uuid.UUID
    n_features_in: int | None
    feature_names: list[str] | None
    feature_kinds: list[str] | None

    @classmethod
    def of(cls, model: ModelVersion) -> "InputSchema":
        return cls(model.id, model.owner_id, model.n_features_in, model.feature_names, model.feature_kinds)


@lru_cache(maxsize=4096)
def _input_schema(version_id: uuid.UUID) -> InputSchema:
    row = db.session.get(ModelVersion, version_id)
    if row is None:
        raise not_found("Model")  # not cached: lru_cache keeps only returned values
    return InputSchema.of(row)


def input_schema(owner_id: uuid.UUID, reference: str) -> InputSchema:
    """The version a job names, for checking its input. A version id is answered from this process's cache
    (no read per job), so whether it can still serve is checked when the job is inserted."""
    try:
        version_id = uuid.UUID(reference)
    except ValueError:
        model = resolve_reference(owner_id, reference)
        require_servable(model)
        return InputSchema.of(model)
    schema = _input_schema(version_id)
    if schema.owner_id != owner_id:
        raise not_found("Model")
    return schema


def require_servable(model: ModelVersion) -> None:
    if model.status == ModelStatus.archived:
        raise ApiError(409, "model_archived", f"Model {model.name} v{model.version} is archived and cannot serve")
