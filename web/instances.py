"""Check prediction inputs against a model's recorded schema before anything is queued."""
from __future__ import annotations

import math
from typing import Any

from web.errors import ApiError
from web.registry import InputSchema


def _invalid(message: str, row: int | None = None, column: Any = None) -> ApiError:
    details = {k: v for k, v in (("row", row), ("column", column)) if v is not None}
    return ApiError(422, "invalid_instances", message, details)


def _check_value(value: Any, kind: str, row: int, column: Any) -> None:
    if value is None:
        return  # a missing value: models that take NaN score it, others fail the job with the model's reason
    if kind == "numeric":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _invalid(f"row {row}, column {column!r}: expected a finite number, got {type(value).__name__}",
                           row, column)
    elif not isinstance(value, (str, int, float, bool)):
        raise _invalid(f"row {row}, column {column!r}: expected a string or number", row, column)


def _row_from_mapping(model: InputSchema, item: dict, row: int) -> list:
    names = model.feature_names
    if not names:
        raise _invalid("this model was trained without feature names: send each instance as an array", row)
    unknown = sorted(set(item) - set(names))
    if unknown:
        raise _invalid(f"row {row}: unknown feature(s) {', '.join(map(repr, unknown[:5]))}", row, unknown[0])
    missing = [name for name in names if name not in item]
    if missing:
        raise _invalid(f"row {row}: missing feature(s) {', '.join(map(repr, missing[:5]))}", row, missing[0])
    return [item[name] for name in names]


def validate_instances(model: InputSchema, instances: list, limit: int) -> list[list]:
    """Rows ordered as the model expects them, or a 422 naming the first bad row and column."""
    if not instances:
        raise _invalid("instances must hold at least one row")
    if len(instances) > limit:
        raise _invalid(f"at most {limit} instances per job; send larger inputs as a batch")
    width = model.n_features_in
    kinds = model.feature_kinds or ["numeric"] * (width or 0)
    rows = []
    for index, item in enumerate(instances):
        if isinstance(item, dict):
            row = _row_from_mapping(model, item, index)
        elif isinstance(item, list):
            row = item
        else:
            raise _invalid(f"row {index}: expected an array of values or an object of named features", index)
        if width is not None and len(row) != width:
            raise _invalid(f"row {index}: expected {width} features, got {len(row)}", index)
        for column, value in enumerate(row):
            name = model.feature_names[column] if model.feature_names else column
            _check_value(value, kinds[column] if column < len(kinds) else "numeric", index, name)
        rows.append(row)
    return rows
