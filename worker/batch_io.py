"""The columnar data path of batch scoring: plan chunks, score a chunk, assemble the output.

Chunking strategy: the planner converts the upload once into an uncompressed Arrow IPC
file (the "staged" file) and chunks are row ranges of it. Measured on a 1M x 30 CSV
(190 MB, 2 noisy cores): pyarrow's streaming CSV reader parses it in ~1.2 s with the
column types fixed from the first block (~1.9 s when it infers them block by block; the
multi-threaded whole-file `read_csv` takes ~1.45 s and holds it all in memory); writing
the IPC file takes ~0.2 s (Parquet 0.6-0.8 s), and a chunk task then memory-maps its rows
without parsing or decoding anything. Byte-range splitting of the CSV would skip that
write and spread parsing over the workers, but has to re-derive pyarrow's quoting rules
to find row boundaries, and lets every chunk guess its own column types; staging lets
pyarrow's parser handle quoted newlines and gives every chunk one schema. The cost is a
serial parse in the planner (~0.8M rows/s at 30 columns). The staged file and the chunk
outputs must live where every worker can read them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from common.table_output import _tmp_path, assemble  # noqa: F401  assemble is part of this module's API
from common.tabular import (
    CSV_BLOCK_SIZE,
    FORMATS,
    MAX_LINE_BYTES,
    TabularError,
    check_column_names,
    csv_options,
    shorten,
)

ERROR_POLICIES = ("skip", "fail_fast")
MAX_ROW_ERRORS = 20
# rows of one chunk the model rejects for reasons other than missing values
MAX_REJECTED_ROWS = 100
STAGED_NAME = "staged.arrow"
# staged-file metadata: text columns whose values are meant as numbers (see _TypePlan)
NUMERIC_TEXT_KEY = b"inferq.numeric_text_columns"
# rows are parsed a block at a time; tests shrink it to reach later blocks cheaply
STAGE_BLOCK_SIZE = CSV_BLOCK_SIZE
_PANDAS_JSON_ROWS = 50_000
_PARQUET_BATCH_ROWS = 64 * 1024


# --------------------------------------------------------------------------- records


@dataclass
class BatchOptions:
    """What a batch job's output holds and how it treats bad rows."""

    include_input: bool = False
    probabilities: bool = True
    id_column: str | None = None
    error_policy: str = "skip"  # or "fail_fast"

    def __post_init__(self) -> None:
        if self.error_policy not in ERROR_POLICIES:
            raise TabularError(f"error_policy must be one of {', '.join(ERROR_POLICIES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchOptions:
        """Build from a task payload, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ChunkSpec:
    """Rows [row_start, row_end) (0-based) of the upload, read from the staged file."""

    index: int
    row_start: int
    row_end: int
    staged: str | None = None

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkSpec:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RowError:
    """Why one row has no prediction; `row` is its 1-based data row number in the upload."""

    row: int
    column: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ChunkResult:
    """What scoring one chunk did: rows read, rows failed and the first few failures."""

    rows: int
    rows_failed: int
    errors: list[RowError] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkResult:
        errors = [RowError(**e) for e in data.get("errors", [])]
        return cls(rows=data["rows"], rows_failed=data["rows_failed"], errors=errors)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RowFailure(Exception):
    """A bad row under the "fail_fast" policy."""

    def __init__(self, row: int, column: str | None, reason: str) -> None:
        # the fields are the args, so the exception survives pickling into a task result
        super().__init__(row, column, reason)
        self.row, self.column, self.reason = row, column, reason

    def __str__(self) -> str:
        where = f"row {self.row}" + (f", column {self.column!r}" if self.column else "")
        return f"{where}: {self.reason}"


# --------------------------------------------------------------------------- planning


def plan_chunks(
    path: Path, fmt: str, rows_per_chunk: int, workdir: Path, *, id_column: str | None = None
) -> tuple[int, list[ChunkSpec]]:
    """Stage the upload in `workdir` and split it into chunks of `rows_per_chunk` rows.

    `id_column`, when given, is read from a CSV as text so ids such as "007" pass through verbatim.
    """
    if rows_per_chunk < 1:
        raise ValueError("rows_per_chunk must be positive")
    if fmt not in FORMATS:
        raise TabularError(f"unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    staged = workdir / STAGED_NAME
    rows_total = _stage(Path(path), fmt, staged, (id_column,) if id_column else ())
    if rows_total == 0:
        raise TabularError("the file has a header but no rows")
    starts = range(0, rows_total, rows_per_chunk)
    chunks = [
        ChunkSpec(i, start, min(start + rows_per_chunk, rows_total), str(staged))
        for i, start in enumerate(starts)
    ]
    return rows_total, chunks


class _Conflict(Exception):
    """A later block holds a value the column's planned type cannot take."""

    def __init__(self, column: str, seen: pa.DataType | None = None) -> None:
        super().__init__(column)
        self.column, self.seen = column, seen


class _NeedsPandas(Exception):
    """pyarrow's JSON reader cannot read this file (a column mixes numbers and text)."""


class _BlockTooSmall(Exception):
    """One row does not fit into a reader block."""


@dataclass
class _TypePlan:
    """Column types for the whole file, decided from its first block and widened on conflict.

    Streaming readers fix the types after the first block; a later value that does not
    fit (1.5 in an int column, "abc" in a float column) raises, and staging restarts with
    that column widened: int -> float64 -> string. A number column widened to text is
    remembered in `numeric_text` so scoring parses it and reports the bad cells by row.
    """

    types: dict[str, pa.DataType] = field(default_factory=dict)
    numeric_text: set[str] = field(default_factory=set)
    # empty in the first block: when such a column turns out to be text, it is just text
    unknown: set[str] = field(default_factory=set)
    block_size: int = CSV_BLOCK_SIZE
    use_pandas: bool = False
    text_columns: tuple[str, ...] = ()

    def widen(self, conflict: _Conflict) -> None:
        old = self.types.get(conflict.column, pa.null())
        if pa.types.is_null(old):
            self.unknown.add(conflict.column)
        if pa.types.is_null(old) and conflict.seen is not None:
            new = conflict.seen
        elif pa.types.is_integer(old) or pa.types.is_null(old):
            new = pa.float64()
        else:
            new = pa.string()
        was_number = pa.types.is_integer(old) or pa.types.is_floating(old)
        if was_number and pa.types.is_string(new) and conflict.column not in self.unknown:
            self.numeric_text.add(conflict.column)
        self.types[conflict.column] = new

    def schema(self) -> pa.Schema:
        meta = {NUMERIC_TEXT_KEY: json.dumps(sorted(self.numeric_text)).encode()}
        return pa.schema(list(self.types.items()), metadata=meta)


def _stage(path: Path, fmt: str, staged: Path, text_columns: tuple[str, ...]) -> int:
    """Write the upload as one Arrow IPC file with a single schema; return its row count."""
    plan = _TypePlan(block_size=STAGE_BLOCK_SIZE, text_columns=text_columns)
    sources = {"csv": _csv_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches}
    while True:
        try:
            return _write_staged(sources[fmt](path, plan), staged)
        except _Conflict as conflict:
            if plan.types.get(conflict.column) == pa.string():
                raise TabularError(f"cannot read column {conflict.column!r}") from None
            plan.widen(conflict)
        except _NeedsPandas:
            plan.use_pandas, plan.types, plan.numeric_text = True, {}, set()
        except _BlockTooSmall:
            if plan.block_size >= MAX_LINE_BYTES:
                raise TabularError("a row is too long (over 64 MB)") from None
            plan.block_size *= 4


def _write_staged(source: tuple[pa.Schema, Iterator[pa.RecordBatch]], staged: Path) -> int:
    schema, batches = source
    check_column_names(schema.names)
    tmp = _tmp_path(staged)
    rows = 0
    try:
        with ipc.new_file(tmp, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        os.replace(tmp, staged)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


_CSV_COLUMN = re.compile(r"In CSV column #(\d+)")


def _csv_batches(path: Path, plan: _TypePlan) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    read, parse, convert = csv_options(path)
    read.block_size = plan.block_size
    convert.column_types = {name: pa.string() for name in plan.text_columns}
    if not plan.types:
        _probe_csv(path, plan, read, parse, convert)
    # explicit types parse ~35% faster than letting the reader infer them block by block
    convert.column_types = plan.schema()
    problem = lambda exc: _csv_problem(exc, plan)  # noqa: E731
    reader = _guard(
        lambda: pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert), problem
    )
    return plan.schema(), _checked(reader, problem)


def _probe_csv(path: Path, plan: _TypePlan, read, parse, convert) -> None:
    """Infer the column types from the first block, as pyarrow would for the whole file."""
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        first = reader.read_next_batch()
    except StopIteration:
        raise TabularError("the file has a header but no rows") from None
    except pa.ArrowInvalid as exc:
        raise _csv_problem(exc, plan) from None
    check_column_names(reader.schema.names)
    plan.types = dict(zip(reader.schema.names, reader.schema.types))
    # pyarrow reads text that is not valid UTF-8 as bytes
    undecodable = [name for name, type_ in plan.types.items() if pa.types.is_binary(type_)]
    if undecodable:
        raise TabularError(f"the file is not UTF-8 encoded text (column {undecodable[0]!r})")
    # a numeric column with a bad cell in the first block is inferred as text
    for name, column in zip(first.schema.names, first.columns):
        if pa.types.is_string(column.type) and name not in plan.text_columns and _mostly_numbers(column):
            plan.numeric_text.add(name)


def _csv_problem(exc: pa.ArrowInvalid, plan: _TypePlan) -> Exception:
    message = str(exc)
    match = _CSV_COLUMN.search(message)
    if "invalid UTF8" in message:
        return TabularError("the file is not UTF-8 encoded text")
    if match and "conversion error" in message:
        return _Conflict(list(plan.types)[int(match.group(1))])
    if "Empty CSV file" in message:
        return TabularError("the file is empty")
    if "straddling" in message:
        return _BlockTooSmall()
    return TabularError(f"the CSV file is malformed: {shorten(message)}")


_JSON_NEW_TYPE = re.compile(r"Column\(/([^/)]*)\) changed from null to (number|string|boolean)")
_JSON_TYPES = {"number": pa.float64(), "string": pa.string(), "boolean": pa.bool_()}


def _jsonl_batches(path: Path, plan: _TypePlan) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if plan.use_pandas:
        return _jsonl_pandas_batches(path, plan)
    read = pajson.ReadOptions(block_size=plan.block_size, use_threads=False)
    if not plan.types:
        probe = _guard(lambda: pajson.open_json(path, read_options=read), lambda exc: _json_problem(exc, plan))
        plan.types = dict(zip(probe.schema.names, probe.schema.types))
    read.use_threads = True
    parse = pajson.ParseOptions(explicit_schema=plan.schema(), unexpected_field_behavior="error")
    problem = lambda exc: _json_problem(exc, plan)  # noqa: E731
    reader = _guard(lambda: pajson.open_json(path, read_options=read, parse_options=parse), problem)
    return plan.schema(), _checked(reader, problem)


def _json_problem(exc: pa.ArrowInvalid, plan: _TypePlan) -> Exception:
    message = str(exc)
    match = _JSON_NEW_TYPE.search(message)
    if match and match.group(1) in plan.types:
        return _Conflict(match.group(1), _JSON_TYPES[match.group(2)])
    if "Column() changed from object" in message:
        return TabularError("expected JSON Lines: one JSON object per line")
    if "changed from" in message or "unexpected field" in message or "Failed to convert JSON" in message:
        return _NeedsPandas()
    if "straddling" in message:
        return _BlockTooSmall()
    if "Empty JSON" in message:
        return TabularError("the file is empty")
    return TabularError(f"not valid JSON Lines (one JSON object per line): {shorten(message)}")


def _jsonl_pandas_batches(path: Path, plan: _TypePlan) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Slow path for JSON Lines whose columns mix types, which pyarrow cannot read."""
    frames = iter(pd.read_json(
        path, lines=True, chunksize=_PANDAS_JSON_ROWS, dtype=False,
        convert_axes=False, convert_dates=False, precise_float=True,
    ))
    first = _next_frame(frames)
    if first is None:
        raise TabularError("the file is empty")
    if not plan.types:
        for name in first.columns:
            plan.types[str(name)] = _inferred_type(first[name], name, plan)

    def batches() -> Iterator[pa.RecordBatch]:
        frame = first
        while frame is not None:
            yield _frame_to_batch(frame, plan)
            frame = _next_frame(frames)

    return plan.schema(), batches()


def _next_frame(frames: Iterator[pd.DataFrame]) -> pd.DataFrame | None:
    try:
        return next(frames, None)
    except ValueError as exc:
        raise TabularError(f"not valid JSON Lines (one JSON object per line): {shorten(str(exc))}") from None


def _inferred_type(series: pd.Series, name: str, plan: _TypePlan) -> pa.DataType:
    try:
        return pa.array(series, from_pandas=True).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        numbers = series.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).sum()
        if numbers * 2 > series.notna().sum():
            plan.numeric_text.add(str(name))
        return pa.string()


def _frame_to_batch(frame: pd.DataFrame, plan: _TypePlan) -> pa.RecordBatch:
    for name in frame.columns:
        if str(name) not in plan.types:
            raise _Conflict(str(name))  # a column first seen in a later chunk
    arrays = []
    for name, type_ in plan.types.items():
        if name not in frame.columns:
            arrays.append(pa.nulls(len(frame), type_))
        elif pa.types.is_string(type_):
            arrays.append(pa.array(_as_text(frame[name]), type=type_, from_pandas=True))
        else:
            try:
                arrays.append(pa.array(frame[name], type=type_, from_pandas=True))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                raise _Conflict(name) from None
    return pa.RecordBatch.from_arrays(arrays, schema=plan.schema())


def _as_text(series: pd.Series) -> pd.Series:
    # only on the slow path: values of a mixed column, numbers kept as their JSON text
    return series.map(lambda v: v if v is None or isinstance(v, str) or v != v else json.dumps(v))


def _parquet_batches(path: Path, plan: _TypePlan) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if path.stat().st_size == 0:
        raise TabularError("the file is empty")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TabularError(f"not a readable Parquet file: {shorten(str(exc))}") from None
    # an IPC file holds one dictionary per column, row groups each bring their own: decode
    decoded = [
        pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in parquet.schema_arrow
    ]
    schema = pa.schema(decoded, metadata={NUMERIC_TEXT_KEY: b"[]"})
    return schema, (batch.cast(schema) for batch in parquet.iter_batches(_PARQUET_BATCH_ROWS))


def _guard(open_reader: Callable[[], Any], problem: Callable[[pa.ArrowInvalid], Exception] | None = None) -> Any:
    try:
        return open_reader()
    except pa.ArrowInvalid as exc:
        if problem is None:
            raise
        raise problem(exc) from None


def _checked(reader: Any, problem: Callable[[pa.ArrowInvalid], Exception]) -> Iterator[pa.RecordBatch]:
    """Iterate a pyarrow reader, translating its errors into staging decisions."""
    try:
        yield from reader
    except pa.ArrowInvalid as exc:
        raise problem(exc) from None


def _mostly_numbers(column: pa.Array) -> bool:
    """True when more non-null values of a text column parse as numbers than not."""
    values = column.drop_null().to_pandas()
    parsed = pd.to_numeric(values, errors="coerce").notna().sum()
    return parsed > 0 and parsed * 2 > len(values)


# --------------------------------------------------------------------------- scoring


def score_chunk(
    source: Path,
    chunk: ChunkSpec,
    model: Any,
    features: list[str] | None,
    n_features: int | None,
    classes: list | None,
    options: BatchOptions,
    out_path: Path,
) -> ChunkResult:
    """Predict one chunk and write its output (Arrow IPC) atomically to `out_path`.

    `source` is the staged file from `plan_chunks`; `chunk.staged`, when set, wins.
    Row-level problems become null predictions with an `error` text ("skip") or a
    RowFailure at the first bad row ("fail_fast").
    """
    table, numeric_text = _read_chunk(Path(chunk.staged or source), chunk)
    n_features = n_features or getattr(model, "n_features_in_", None)
    names = _feature_columns(table.column_names, features, n_features, options.id_column)
    matrix, failures = _feature_matrix(table, names, numeric_text, as_frame=features is not None)
    want_proba = options.probabilities and hasattr(model, "predict_proba")
    predictions, probabilities = _predict(model, matrix, names, failures, want_proba)
    if options.error_policy == "fail_fast" and failures.count:
        raise RowFailure(*failures.first(chunk.row_start))
    labels = _class_labels(model, classes, probabilities)
    scored = _scored_columns(predictions, probabilities, labels, want_proba, failures)
    output = pa.table({**_passthrough_columns(table, options, scored), **scored})
    _write_ipc_atomic(output, Path(out_path))
    return ChunkResult(table.num_rows, failures.count, failures.row_errors(chunk.row_start, MAX_ROW_ERRORS))


def _read_chunk(path: Path, chunk: ChunkSpec) -> tuple[pa.Table, set[str]]:
    try:
        # memory-mapped and uncompressed: slicing the chunk reads only its pages
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
        raise TabularError("score_chunk reads the staged file that plan_chunks writes") from None
    if not 0 <= chunk.row_start <= chunk.row_end <= table.num_rows:
        raise ValueError(f"chunk {chunk.index} rows {chunk.row_start}-{chunk.row_end} are outside the staged file")
    meta = table.schema.metadata or {}
    numeric_text = set(json.loads(meta.get(NUMERIC_TEXT_KEY, b"[]")))
    return table.slice(chunk.row_start, chunk.rows), numeric_text


def _feature_columns(
    columns: list[str], features: list[str] | None, n_features: int | None, id_column: str | None
) -> list[str]:
    """The input columns the model reads, by name or else by position."""
    if id_column is not None and id_column not in columns:
        raise TabularError(f"the id column {id_column!r} is not in the file")
    if features is not None:
        missing = [name for name in features if name not in columns]
        if missing:
            raise TabularError(f"the file lacks the model's feature columns: {', '.join(map(repr, missing))}")
        return list(features)
    if n_features is None:
        raise ValueError("score_chunk needs features or n_features")
    candidates = [name for name in columns if name != id_column]
    if len(candidates) < n_features:
        besides = " besides the id column" if id_column else ""
        raise TabularError(
            f"the model takes {n_features} features but the file has {len(candidates)} columns{besides}"
        )
    return candidates[:n_features]


class _Failures:
    """Per-row failure reasons of one chunk; the first reason recorded for a row wins."""

    def __init__(self, rows: int) -> None:
        self.failed = np.zeros(rows, dtype=bool)
        self.column = np.full(rows, None, dtype=object)
        self.reason = np.full(rows, None, dtype=object)

    @property
    def count(self) -> int:
        return int(self.failed.sum())

    def add(self, rows: np.ndarray, column: Any, reason: Any) -> None:
        """Mark `rows` (a mask) failed; `column` and `reason` are one text or one per marked row."""
        fresh = rows & ~self.failed
        if not fresh.any():
            return
        self.failed |= fresh
        for target, value in ((self.column, column), (self.reason, reason)):
            single = value is None or isinstance(value, str)
            target[fresh] = value if single else np.asarray(value, dtype=object)[fresh[rows]]

    def messages(self) -> pa.Array:
        """The `error` column: "<column>: <reason>" for failed rows, null for the others."""
        if not self.failed.any():
            return pa.nulls(len(self.failed), pa.string())
        text = np.full(len(self.failed), None, dtype=object)
        text[self.failed] = self.reason[self.failed]
        named = self.failed & (self.column != None)  # noqa: E711 (element-wise)
        text[named] = self.column[named] + ": " + self.reason[named]
        return pa.array(text, type=pa.string())

    def first(self, row_start: int) -> tuple[int, str | None, str]:
        i = int(np.argmax(self.failed))
        return row_start + i + 1, self.column[i], self.reason[i]

    def row_errors(self, row_start: int, limit: int) -> list[RowError]:
        rows = np.flatnonzero(self.failed)[:limit]
        return [RowError(row_start + int(i) + 1, self.column[i], self.reason[i]) for i in rows]


def _feature_matrix(
    table: pa.Table, names: list[str], numeric_text: set[str], as_frame: bool
) -> tuple[Any, _Failures]:
    """Build the model input column by column (never row by row) and note unparseable cells."""
    failures = _Failures(table.num_rows)
    numeric = [n for n in names if _is_numeric(table.schema.field(n).type) or n in numeric_text or not as_frame]
    block = np.empty((table.num_rows, len(numeric)), dtype=np.float64, order="F")
    for j, name in enumerate(numeric):
        _fill_numeric(block[:, j], table.column(name), name, failures)
    if not as_frame:
        return block, failures
    if len(numeric) == len(names):
        return pd.DataFrame(block, columns=names, copy=False), failures
    position = {name: j for j, name in enumerate(numeric)}
    columns = {n: block[:, position[n]] if n in position else _frame_column(table.column(n)) for n in names}
    return pd.DataFrame(columns), failures


def _is_numeric(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return any(is_kind(type_) for is_kind in (pa.types.is_integer, pa.types.is_floating,
                                              pa.types.is_boolean, pa.types.is_decimal))


def _fill_numeric(out: np.ndarray, column: pa.ChunkedArray, name: str, failures: _Failures) -> None:
    """Write `column` as float64 into `out` (NaN where missing or not a number)."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column = pc.cast(column, pa.float64())
        except pa.ArrowInvalid:
            out[:] = _parse_numbers(column, name, failures)
            return
    elif not _is_numeric(column.type):
        raise TabularError(f"column {name!r} holds {column.type} values, not numbers")
    offset = 0
    for piece in column.chunks:
        if piece.type != pa.float64():
            piece = pc.cast(piece, pa.float64(), safe=False)
        out[offset : offset + len(piece)] = piece.to_numpy(zero_copy_only=False)
        offset += len(piece)


def _parse_numbers(column: pa.ChunkedArray, name: str, failures: _Failures) -> np.ndarray:
    """Parse a text column leniently; a cell that is present but not a number fails its row."""
    text = column.to_pandas()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & text.notna().to_numpy()
    shown = pa.array(text[bad].str.slice(0, 50), type=pa.string())
    reasons = pc.binary_join_element_wise("'", shown, "' is not a number", "")
    failures.add(bad, name, reasons.to_numpy(zero_copy_only=False))
    return values


def _frame_column(column: pa.ChunkedArray) -> pd.Series:
    # pandas' own readers mark missing text as NaN, so fitted encoders expect NaN, not None
    series = column.to_pandas()
    return series.where(series.notna(), np.nan) if series.dtype == object else series


def _predict(
    model: Any, matrix: Any, names: list[str], failures: _Failures, want_proba: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Predict the rows without failures; rows the model rejects fail, the others are predicted.

    When the model rejects the chunk, rows with a missing (or infinite) number fail first,
    then rows with any missing value (text usually goes to an encoder that takes it), and
    any other rejection (say an unknown category) is narrowed down to rows by halving.
    """
    try:
        return _predict_rows(model, matrix, ~failures.failed, want_proba)
    except (ValueError, TypeError) as exc:
        rejection = exc
    for numbers_only in (True, False):
        if _fail_unusable(matrix, names, failures, numbers_only):
            try:
                return _predict_rows(model, matrix, ~failures.failed, want_proba)
            except (ValueError, TypeError) as exc:
                rejection = exc
    if not _fail_rejected(model, matrix, failures, want_proba):
        raise rejection
    return _predict_rows(model, matrix, ~failures.failed, want_proba)


def _predict_rows(
    model: Any, matrix: Any, rows: np.ndarray, want_proba: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not rows.any():
        return None, None
    subset = matrix if rows.all() else _take(matrix, np.flatnonzero(rows))
    predictions = np.asarray(model.predict(subset))
    return predictions, (np.asarray(model.predict_proba(subset)) if want_proba else None)


def _take(matrix: Any, rows: np.ndarray) -> Any:
    return matrix.iloc[rows] if isinstance(matrix, pd.DataFrame) else matrix[rows]


def _fail_unusable(matrix: Any, names: list[str], failures: _Failures, numbers_only: bool) -> bool:
    """Fail the rows holding a missing or infinite value; False if that fails no new row."""
    missing, infinite = _not_finite(matrix, numbers_only)
    unusable = (missing | infinite) & ~failures.failed[:, None]
    rows = unusable.any(axis=1)
    if not rows.any():
        return False
    first = np.argmax(unusable, axis=1)[rows]
    reasons = np.where(infinite[rows, first], "infinite value", "missing value")
    failures.add(rows, np.asarray(names, dtype=object)[first], reasons)
    return True


def _not_finite(matrix: Any, numbers_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Masks (rows x features) of the missing and of the infinite cells."""
    if not isinstance(matrix, pd.DataFrame):
        return np.isnan(matrix), np.isinf(matrix)
    missing = np.zeros(matrix.shape, dtype=bool)
    infinite = np.zeros(matrix.shape, dtype=bool)
    for j, (_, column) in enumerate(matrix.items()):
        if column.dtype.kind == "f":
            values = column.to_numpy()
            missing[:, j], infinite[:, j] = np.isnan(values), np.isinf(values)
        elif not numbers_only:
            missing[:, j] = column.isna().to_numpy()
    return missing, infinite


class _TooManyRejected(Exception):
    pass


def _fail_rejected(model: Any, matrix: Any, failures: _Failures, want_proba: bool) -> bool:
    """Find the rows the model rejects by predicting halves of the chunk; False if none or too many.

    Costs about (log2(rows) + 2) predictions of the chunk when a few rows are bad; past
    MAX_REJECTED_ROWS the chunk fails as a whole with the model's own message.
    """
    found: dict[int, str] = {}

    def search(rows: np.ndarray) -> None:
        if not len(rows):
            return
        try:
            _predict_rows(model, _take(matrix, rows), np.ones(len(rows), dtype=bool), want_proba)
        except (ValueError, TypeError) as exc:
            if len(rows) == 1:
                found[int(rows[0])] = shorten(str(exc))
                if len(found) > MAX_REJECTED_ROWS:
                    raise _TooManyRejected from None
                return
            search(rows[: len(rows) // 2])
            search(rows[len(rows) // 2 :])

    candidates = np.flatnonzero(~failures.failed)
    try:
        search(candidates[: len(candidates) // 2])
        search(candidates[len(candidates) // 2 :])
    except _TooManyRejected:
        return False
    rows = np.zeros(len(failures.failed), dtype=bool)
    rows[list(found)] = True
    failures.add(rows, None, [found[row] for row in sorted(found)])
    return bool(found)


def _class_labels(model: Any, classes: list | None, probabilities: np.ndarray | None) -> list:
    labels = list(classes) if classes is not None else list(getattr(model, "classes_", []))
    if probabilities is not None and probabilities.shape[1] != len(labels):
        raise ValueError(f"predict_proba gave {probabilities.shape[1]} columns for {len(labels)} classes")
    return labels


def _scored_columns(
    predictions: np.ndarray | None,
    probabilities: np.ndarray | None,
    labels: list,
    with_proba: bool,
    failures: _Failures,
) -> dict[str, pa.Array]:
    """prediction, proba_<class> per class (if with_proba), error; null where a row failed."""
    good = ~failures.failed
    # a chunk whose rows all failed still types its prediction column like the others
    label_type = pa.array(np.asarray(labels)).type if labels else pa.float64()
    scored = {"prediction": _with_nulls(predictions, good, label_type)}
    for j, label in enumerate(labels if with_proba else []):
        column = None if probabilities is None else probabilities[:, j]
        scored[f"proba_{label}"] = _with_nulls(column, good, pa.float64())
    scored["error"] = failures.messages()
    return scored


def _passthrough_columns(table: pa.Table, options: BatchOptions, scored: dict[str, Any]) -> dict[str, Any]:
    """The id column, then the other input columns when asked for."""
    names = [options.id_column] if options.id_column else []
    if options.include_input:
        names += [name for name in table.column_names if name != options.id_column]
    columns = {}
    for name in names:
        # an input column named like an output column keeps its data as "input_<name>"
        new = name
        while new in scored or new in columns or (new != name and new in names):
            new = f"input_{new}"
        columns[new] = table.column(name)
    return columns


def _with_nulls(values: np.ndarray | None, good: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A full-chunk column: `values` at the good rows, null at the failed ones."""
    if values is None:
        return pa.nulls(len(good), type_)
    if good.all():
        return pa.array(values)
    full = np.full(len(good), None, dtype=object) if values.dtype == object else np.zeros(len(good), values.dtype)
    full[good] = values
    return pa.array(full, mask=~good)


def _write_ipc_atomic(table: pa.Table, out_path: Path) -> None:
    """Write to a temporary file and rename, so a re-run chunk replaces its output whole."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(out_path)
    try:
        with ipc.new_file(tmp, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
