"""What every scoring task needs: a model version's serving metadata and its loaded model."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import lru_cache

from common.artifacts import load_trusted
from common.models import ModelVersion
from worker import runtime
from worker.model_cache import CacheLookup


@dataclass(frozen=True)
class ModelInfo:
    id: uuid.UUID
    name: str
    artifact_path: str
    artifact_sha256: str
    task_kind: str
    n_features_in: int | None
    feature_names: tuple[str, ...] | None
    feature_kinds: tuple[str, ...] | None
    classes: tuple | None
    has_predict_proba: bool


@lru_cache(maxsize=1024)
def model_info(version_id: uuid.UUID) -> ModelInfo:
    """A version's serving metadata; versions are immutable, so it is cached for the process's life."""
    return runtime.with_db_retry(lambda: _read_model_info(version_id))


def _read_model_info(version_id: uuid.UUID) -> ModelInfo:
    with runtime.session() as s:
        if (m := s.get(ModelVersion, version_id)) is None:  # deleted with its owner
            raise LookupError(f"model version {version_id} does not exist")
        return ModelInfo(m.id, m.name, m.artifact_path, m.artifact_sha256, m.task_kind, m.n_features_in,
                         tuple(m.feature_names) if m.feature_names else None,
                         tuple(m.feature_kinds) if m.feature_kinds else None,
                         tuple(m.classes) if m.classes is not None else None, m.has_predict_proba)


def load_model(info: ModelInfo) -> CacheLookup:
    """The model from this process's LRU cache, loaded from its validated skops artifact on a miss."""
    return runtime.model_cache().get((info.id, info.artifact_sha256),
                                     lambda: load_trusted(runtime.artifact_store().path(info.artifact_path)))
