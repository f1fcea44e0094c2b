"""Tabular upload formats: detect them and read their column names cheaply.

The web process uses this to validate a batch upload before enqueueing it, so
nothing here reads more than the start of the file. The worker reads the same
files with the same pyarrow options (`csv_options`), so both agree on what the
columns are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = ("csv", "jsonl", "parquet")

_EXTENSIONS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_SNIFF_BYTES = 64 * 1024
_DELIMITERS = (",", ";", "\t", "|")
# pyarrow parses a block at a time and a single row must fit into one block
CSV_BLOCK_SIZE = 4 << 20
MAX_LINE_BYTES = 64 << 20
# strings shown to users in error messages are cut to this length
_SHOWN_CHARS = 200


class TabularError(ValueError):
    """A problem with an uploaded table; the message is meant for the user."""


def detect_format(path: Path, filename: str | None = None) -> str:
    """Return "csv", "jsonl" or "parquet" from the file name's extension, else its content."""
    suffix = Path(filename or path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        raise TabularError("the file is empty")
    if b"\x00" in head or not _is_utf8_prefix(head):
        raise TabularError("unrecognised file format: expected CSV, JSON Lines or Parquet")
    return "jsonl" if text.startswith(b"{") else "csv"


def read_columns(path: Path, fmt: str) -> list[str]:
    """Return the file's column names, reading only its start; TabularError if it has no rows."""
    readers = {"csv": _csv_columns, "jsonl": _jsonl_columns, "parquet": _parquet_columns}
    if fmt not in readers:
        raise TabularError(f"unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}")
    columns = readers[fmt](Path(path))
    check_column_names(columns)
    return columns


def check_column_names(columns: list[str]) -> None:
    """Reject duplicate column names: a column must be selectable by its name."""
    seen, duplicates = set(), []
    for name in columns:
        if name in seen and name not in duplicates:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise TabularError(f"duplicate column names: {', '.join(map(repr, duplicates))}")


def csv_options(path: Path) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """The pyarrow options InferQ reads a CSV with (delimiter sniffed from the header)."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    read = pacsv.ReadOptions(block_size=CSV_BLOCK_SIZE)
    # quoted fields may hold newlines; costs ~5% parse speed in the streaming reader
    parse = pacsv.ParseOptions(delimiter=_sniff_delimiter(head), newlines_in_values=True)
    # as in pandas, an empty cell is missing in every column, text columns included
    convert = pacsv.ConvertOptions(strings_can_be_null=True)
    return read, parse, convert


def shorten(text: str) -> str:
    """Cut user data quoted in an error message to a readable length."""
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _csv_columns(path: Path) -> list[str]:
    read, parse, convert = csv_options(path)
    read.use_threads = False
    # parse only the file's first block, from memory: a reader opened on the path reads ahead,
    # which costs the web process memory in proportion to the upload
    with open(path, "rb") as f:
        head = f.read(read.block_size)
        if f.read(1) and b"\n" in head:
            head = head[:head.rindex(b"\n") + 1]
    try:
        reader = pacsv.open_csv(pa.BufferReader(head), read_options=read, parse_options=parse,
                                convert_options=convert)
        columns = reader.schema.names
        reader.read_next_batch()
        if any(pa.types.is_binary(t) for t in reader.schema.types):
            # pyarrow reads text that is not valid UTF-8 as bytes
            raise TabularError("the file is not UTF-8 encoded text")
    except StopIteration:
        raise TabularError("the file has a header but no rows") from None
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise TabularError("the file is empty") from None
        raise TabularError(f"not a readable CSV file: {shorten(str(exc))}") from None
    return columns


def _jsonl_columns(path: Path) -> list[str]:
    with open(path, "rb") as f:
        for line in iter(lambda: f.readline(MAX_LINE_BYTES), b""):
            if line.strip():
                return list(_json_object(line, path).keys())
    raise TabularError("the file is empty")


def _json_object(line: bytes, path: Path) -> dict:
    if not line.endswith(b"\n") and len(line) >= MAX_LINE_BYTES:
        raise TabularError("the first line is too long to be a JSON Lines record")
    try:
        record = json.loads(line.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        raise TabularError("the first line is not valid JSON (expected one JSON object per line)") from None
    if not isinstance(record, dict):
        raise TabularError("expected JSON Lines: one JSON object per line")
    return record


def _parquet_columns(path: Path) -> list[str]:
    if path.stat().st_size == 0:
        raise TabularError("the file is empty")
    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise TabularError(f"not a readable Parquet file: {shorten(str(exc))}") from None
    if metadata.num_rows == 0:
        raise TabularError("the file has a header but no rows")
    return metadata.schema.to_arrow_schema().names


def _sniff_delimiter(head: bytes) -> str:
    """Comma unless the header line has none and another common delimiter instead."""
    header = head.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0]
    counts = {d: header.count(d.encode()) for d in _DELIMITERS}
    if counts[","]:
        return ","
    best = max(_DELIMITERS, key=counts.__getitem__)
    return best if counts[best] else ","


def _is_utf8_prefix(data: bytes) -> bool:
    # the sniffed prefix may end inside a multi-byte character
    for cut in range(4):
        try:
            data[: len(data) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False
