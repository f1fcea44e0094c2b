"""Writing scored tables: chunk outputs (Arrow IPC) assembled in order into CSV, JSON Lines or Parquet.

Both sides need it: workers assemble a finished batch in the input's format, and the web
assembles another format on demand when a download asks for one.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from common.tabular import FORMATS, TabularError


def _tmp_path(path: Path) -> Path:
    # unique per writer: two runs of one chunk never share a temporary file
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


# chunks encoded at once while assembling: pyarrow's CSV writer and compute kernels release the GIL, so
# threads spread the encoding over the cores; at most twice as many encoded chunks wait in memory
ENCODE_THREADS = 4


def assemble(chunk_outputs: list[Path], out_path: Path, fmt: str) -> None:
    """Concatenate chunk outputs in order into one CSV / JSON Lines / Parquet file, atomically."""
    if fmt not in FORMATS:
        raise TabularError(f"unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not chunk_outputs:
        raise ValueError("assemble needs at least one chunk output")
    # a chunk whose rows all failed has null-typed columns; unify to the others' types
    schemas = [_open_output(p).schema for p in chunk_outputs]
    schema = pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
    out_path = Path(out_path)
    tmp = _tmp_path(out_path)
    try:
        with _OutputWriter(fmt, tmp, schema) as writer:
            def encode(path: Path) -> Any:
                return writer.encode(_open_output(path).read_all().select(schema.names).cast(schema))

            for encoded in _in_order(encode, chunk_outputs):
                writer.write(encoded)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def _in_order(fn: Callable[[Path], Any], items: list[Path]) -> Iterator[Any]:
    """fn of each item, computed on ENCODE_THREADS threads, yielded in the items' order."""
    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="assemble") as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * ENCODE_THREADS:  # the threads never wait for the writer
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _open_output(path: Path) -> ipc.RecordBatchFileReader:
    return ipc.open_file(pa.memory_map(str(path)))


class _OutputWriter:
    """Writes encoded tables into a CSV, JSON Lines or Parquet file; `encode` may run on any thread."""

    def __init__(self, fmt: str, path: Path, schema: pa.Schema) -> None:
        self.fmt = fmt
        if fmt == "parquet":
            self._sink = pq.ParquetWriter(str(path), schema)
            return
        self._sink = open(path, "wb")
        if fmt == "csv":
            self._sink.write(_csv_bytes(schema.empty_table(), header=True))

    def encode(self, table: pa.Table) -> Any:
        if self.fmt == "csv":
            return [_csv_bytes(table, header=False)]
        if self.fmt == "jsonl":
            return [_string_data(part) for part in _jsonl_lines(table.combine_chunks()).chunks]
        return table

    def write(self, encoded: Any) -> None:
        if self.fmt == "parquet":
            self._sink.write_table(encoded)
            return
        for part in encoded:
            self._sink.write(part)

    def __enter__(self) -> _OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sink.close()


def _csv_bytes(table: pa.Table, header: bool) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=header))
    return sink.getvalue()


_LARGE = pa.large_string()
_JSON_ESCAPES = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


def _jsonl_lines(table: pa.Table) -> pa.ChunkedArray:
    """One JSON object text per row, newline-terminated, built with vectorised string kernels."""
    parts: list[Any] = []
    for i, name in enumerate(table.column_names):
        parts.append(pa.scalar(("{" if i == 0 else ",") + json.dumps(name) + ":", _LARGE))
        parts.append(_json_values(table.column(name)))
    parts.append(pa.scalar("}\n", _LARGE))
    return pc.binary_join_element_wise(*parts, pa.scalar("", _LARGE))


def _json_values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The JSON text of each value of `column` (never null: missing values are `null`)."""
    type_ = column.type
    if pa.types.is_dictionary(type_):
        return _json_values(column.cast(type_.value_type))
    if pa.types.is_floating(type_):
        # JSON has no NaN or Infinity
        text = pc.if_else(pc.is_finite(column), pc.cast(column, _LARGE), pa.scalar(None, _LARGE))
    elif pa.types.is_integer(type_) or pa.types.is_boolean(type_) or pa.types.is_decimal(type_):
        text = pc.cast(column, _LARGE)
    elif pa.types.is_string(type_) or pa.types.is_large_string(type_):
        text = _json_strings(pc.cast(column, _LARGE))
    elif pa.types.is_null(type_):
        text = pa.chunked_array([pa.nulls(len(column), _LARGE)])
    elif pa.types.is_temporal(type_):
        text = _json_strings(pc.cast(column, _LARGE))
    else:
        # nested or binary values (JSON Lines input only): rare, so plain Python
        dumped = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
        text = pa.chunked_array([pa.array(dumped, _LARGE)])
    return pc.fill_null(text, pa.scalar("null", _LARGE))


def _json_strings(text: pa.ChunkedArray) -> pa.ChunkedArray:
    text = pc.replace_substring(text, "\\", "\\\\")
    text = pc.replace_substring(text, '"', '\\"')
    if pc.any(pc.match_substring_regex(text, r"[\x00-\x1f]")).as_py():
        for code in range(0x20):
            text = pc.replace_substring(text, chr(code), _JSON_ESCAPES.get(code, f"\\u{code:04x}"))
    quote = pa.scalar('"', _LARGE)
    return pc.binary_join_element_wise(quote, text, quote, pa.scalar("", _LARGE))


def _string_data(array: pa.Array) -> memoryview:
    """The UTF-8 bytes of all values of a large_string array, back to back."""
    if not len(array):
        return memoryview(b"")
    _, offsets, data = array.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    return memoryview(data)[bounds[0] : bounds[-1]]
