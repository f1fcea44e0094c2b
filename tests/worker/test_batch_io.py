"""The batch-scoring data path on real files: plan, score every chunk, assemble."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from bench.make_data import make_classification_csv
from common.table_output import ENCODE_THREADS
from common.tabular import TabularError, detect_format, read_columns
from worker import batch_io
from worker.batch_io import (
    BatchOptions,
    ChunkResult,
    ChunkSpec,
    RowError,
    RowFailure,
    assemble,
    plan_chunks,
    score_chunk,
)

FEATURES = ["a", "b", "c"]
FORMATS = ("csv", "jsonl", "parquet")


# --------------------------------------------------------------------------- helpers


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write `frame` in the format named by the path's extension."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def read_output(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        # ids are text in every test; pyarrow would read "007" back as the number 7
        as_text = pacsv.ConvertOptions(column_types={"id": pa.string()}, strings_can_be_null=True)
        return pacsv.read_csv(path, convert_options=as_text).to_pandas()
    if fmt == "jsonl":
        return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])
    return pq.read_table(path).to_pandas()


def run_batch(
    path: Path,
    model,
    tmp_path: Path,
    *,
    fmt: str | None = None,
    out_fmt: str = "csv",
    rows_per_chunk: int = 16,
    options: BatchOptions | None = None,
    features: list[str] | None | str = "model",
    n_features: int | None = None,
) -> tuple[pd.DataFrame, list[ChunkResult]]:
    """What the planner, the chunk tasks and the final step do, in one process."""
    fmt = fmt or detect_format(path, path.name)
    options = options or BatchOptions()
    if features == "model":
        features = list(model.feature_names_in_)
    workdir = tmp_path / "work"
    _, chunks = plan_chunks(path, fmt, rows_per_chunk, workdir, id_column=options.id_column)
    results, outputs = [], []
    for chunk in chunks:
        out = workdir / f"chunk-{chunk.index}.arrow"
        results.append(score_chunk(path, chunk, model, features, n_features, None, options, out))
        outputs.append(out)
    final = tmp_path / f"scored.{out_fmt}"
    assemble(outputs, final, out_fmt)
    return read_output(final, out_fmt), results


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    data = pd.DataFrame(np.round(rng.standard_normal((50, 3)), 4), columns=FEATURES)
    data.insert(0, "id", [f"r{i:03d}" for i in range(50)])
    return data


@pytest.fixture(scope="module")
def model(frame) -> LogisticRegression:
    labels = np.where(frame.a + frame.b > 0.5, "yes", np.where(frame.c > 0, "maybe", "no"))
    return LogisticRegression().fit(frame[FEATURES], labels)


def assert_scored_like(output: pd.DataFrame, model, inputs: pd.DataFrame) -> None:
    """Every row, in order, carries model.predict / predict_proba of the same input row."""
    assert list(output.prediction) == list(model.predict(inputs))
    probabilities = output[[f"proba_{c}" for c in model.classes_]].to_numpy()
    np.testing.assert_allclose(probabilities, model.predict_proba(inputs), rtol=1e-12)


# --------------------------------------------------------------------------- scoring


def test_200k_rows_in_chunks_match_model_predict_row_by_row(tmp_path):
    path = tmp_path / "big.csv"
    fitted, names = make_classification_csv(path, 200_000, cols=8, seed=3)
    output, results = run_batch(path, fitted, tmp_path, rows_per_chunk=30_000)
    inputs = pacsv.read_csv(path).to_pandas()
    assert len(results) == 7 and [r.rows for r in results] == [30_000] * 6 + [20_000]
    assert len(output) == 200_000
    assert_scored_like(output, fitted, inputs[names])
    assert output.error.isna().all() and sum(r.rows_failed for r in results) == 0


@pytest.mark.parametrize("in_fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("out_fmt", ["csv", "jsonl", "parquet"])
def test_every_format_in_and_out_keeps_rows_ids_and_order(tmp_path, frame, model, in_fmt, out_fmt):
    path = write_table(frame, tmp_path / f"upload.{in_fmt}")
    options = BatchOptions(id_column="id")
    output, results = run_batch(path, model, tmp_path, out_fmt=out_fmt, options=options)
    assert list(output.columns) == ["id", "prediction", "proba_maybe", "proba_no", "proba_yes", "error"]
    assert list(output.id) == list(frame.id)
    assert_scored_like(output, model, frame[FEATURES])
    assert [r.rows for r in results] == [16, 16, 16, 2]


@pytest.mark.parametrize("out_fmt", ["csv", "jsonl", "parquet"])
def test_many_chunks_encoded_on_threads_are_assembled_in_order(tmp_path, frame, model, out_fmt):
    path = write_table(frame, tmp_path / "upload.csv")
    output, results = run_batch(path, model, tmp_path, out_fmt=out_fmt, rows_per_chunk=2,
                                options=BatchOptions(id_column="id"))
    assert len(results) == 25 > 2 * ENCODE_THREADS + 1  # more chunks than are ever encoded ahead
    assert list(output.id) == list(frame.id)
    assert_scored_like(output, model, frame[FEATURES])


def test_probability_columns_follow_the_classes_and_can_be_left_out(tmp_path, frame, model):
    path = write_table(frame, tmp_path / "upload.csv")
    output, _ = run_batch(path, model, tmp_path)
    probabilities = output[[f"proba_{c}" for c in ["maybe", "no", "yes"]]]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    without, _ = run_batch(path, model, tmp_path, options=BatchOptions(probabilities=False))
    assert list(without.columns) == ["prediction", "error"]


def test_a_model_without_predict_proba_gets_predictions_only(tmp_path, frame):
    regressor = LinearRegression().fit(frame[FEATURES].to_numpy(), frame.a * 2 + 1)
    path = write_table(frame, tmp_path / "upload.parquet")
    options = BatchOptions(id_column="id")
    output, _ = run_batch(path, regressor, tmp_path, features=None, n_features=3, options=options)
    assert list(output.columns) == ["id", "prediction", "error"]
    np.testing.assert_allclose(output.prediction, regressor.predict(frame[FEATURES].to_numpy()))


def test_positional_model_reads_the_first_columns_besides_the_id(tmp_path, frame):
    reordered = frame[["a", "id", "b", "c"]]
    positional = LogisticRegression().fit(frame[FEATURES].to_numpy(), frame.a > 0)
    path = write_table(reordered, tmp_path / "upload.csv")
    options = BatchOptions(id_column="id")
    output, _ = run_batch(path, positional, tmp_path, features=None, n_features=3, options=options)
    assert list(output.prediction) == list(positional.predict(frame[FEATURES].to_numpy()))
    assert list(output.columns) == ["id", "prediction", "proba_False", "proba_True", "error"]


def test_include_input_puts_id_first_then_the_inputs_verbatim(tmp_path, frame, model):
    data = frame.assign(id=[f"00{i}" for i in range(50)], note=["x, \"quoted\"\nline"] * 50)
    path = write_table(data, tmp_path / "upload.csv")
    options = BatchOptions(include_input=True, id_column="id")
    output, _ = run_batch(path, model, tmp_path, options=options)
    assert list(output.columns) == [
        "id", "a", "b", "c", "note", "prediction", "proba_maybe", "proba_no", "proba_yes", "error"
    ]
    assert list(output.id.astype(str)) == [f"00{i}" for i in range(50)]  # not turned into numbers
    assert (output.note == "x, \"quoted\"\nline").all()
    np.testing.assert_array_equal(output[FEATURES].to_numpy(), data[FEATURES].to_numpy())


def test_input_columns_named_like_outputs_are_kept_under_another_name(tmp_path, frame, model):
    data = frame.assign(prediction="old", error="none")
    path = write_table(data, tmp_path / "upload.parquet")
    output, _ = run_batch(path, model, tmp_path, options=BatchOptions(include_input=True))
    assert (output.input_prediction == "old").all() and (output.input_error == "none").all()
    assert output.error.isna().all()


def test_parquet_dictionary_columns_with_one_dictionary_per_row_group(tmp_path, model):
    path = tmp_path / "kinds.parquet"
    schema = pa.schema([("kind", pa.dictionary(pa.int32(), pa.string()))] + [(f, pa.float64()) for f in FEATURES])
    with pq.ParquetWriter(path, schema) as writer:
        for kinds in (["x", "y"] * 10, ["z"] * 20):
            numbers = {f: np.linspace(-1, 1, 20) for f in FEATURES}
            writer.write_table(pa.table({"kind": pa.array(kinds).dictionary_encode(), **numbers}, schema=schema))
    output, _ = run_batch(path, model, tmp_path, out_fmt="parquet", options=BatchOptions(include_input=True))
    assert list(output.kind) == ["x", "y"] * 10 + ["z"] * 20
    assert output.error.isna().all()


def test_string_columns_reach_a_column_transformer_pipeline_as_a_dataframe(tmp_path):
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"city": rng.choice(["Paris", "Oslo", "Lima"], 300), "age": rng.integers(18, 90, 300),
                         "income": np.round(rng.normal(50, 10, 300), 2)})
    target = (data.city == "Oslo") | (data.income > 55)
    pipeline = make_pipeline(
        ColumnTransformer([("city", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                           ("num", StandardScaler(), ["age", "income"])]),
        LogisticRegression(),
    ).fit(data, target)
    path = write_table(data[["income", "city", "age"]], tmp_path / "upload.csv")
    output, results = run_batch(path, pipeline, tmp_path, rows_per_chunk=128)
    assert_scored_like(output, pipeline, data)
    assert sum(r.rows_failed for r in results) == 0


def test_pipeline_rows_with_missing_or_unknown_values_fail_alone(tmp_path):
    train = pd.DataFrame({"city": ["Paris", "Oslo", "Lima"] * 20, "income": np.linspace(20, 80, 60)})
    pipeline = make_pipeline(
        ColumnTransformer([("city", OneHotEncoder(), ["city"]), ("num", StandardScaler(), ["income"])]),
        LogisticRegression(),
    ).fit(train, train.income > 50)
    data = train.copy().astype({"city": object})
    data.loc[5, "income"] = None
    data.loc[17, "city"] = None
    data.loc[40, "city"] = "Rome"  # OneHotEncoder(handle_unknown="error") refuses it
    path = write_table(data, tmp_path / "upload.csv")
    output, results = run_batch(path, pipeline, tmp_path, rows_per_chunk=30)
    errors = output.error.dropna()
    assert list(errors.index) == [5, 17, 40]
    assert errors[5] == "income: missing value" and errors[17] == "city: missing value"
    assert "unknown categories" in errors[40] and "Rome" in errors[40]
    good = output.error.isna().to_numpy()
    assert list(output.prediction[good]) == list(pipeline.predict(data[good]))
    assert [e.column for e in results[1].errors] == [None]


# --------------------------------------------------------------------------- bad rows


@pytest.fixture
def bad_csv(tmp_path, frame) -> Path:
    """Row 3 has text in a number column, row 20 a missing value."""
    text = frame.astype({"b": object})
    text.loc[2, "b"] = "abc"
    text.loc[19, "c"] = None
    return write_table(text, tmp_path / "bad.csv")


def test_skip_marks_bad_rows_and_scores_the_rest(tmp_path, frame, model, bad_csv):
    output, results = run_batch(bad_csv, model, tmp_path, options=BatchOptions(id_column="id"))
    assert output.loc[2, "error"] == "b: 'abc' is not a number"
    assert output.loc[19, "error"] == "c: missing value"
    failed = output.error.notna()
    assert list(np.flatnonzero(failed)) == [2, 19]
    assert output.loc[failed, ["prediction", "proba_yes"]].isna().all().all()
    assert_scored_like(output[~failed], model, frame[FEATURES][~failed.to_numpy()])
    assert [r.rows_failed for r in results] == [1, 1, 0, 0]
    assert results[0].errors == [RowError(3, "b", "'abc' is not a number")]
    as_json = json.loads(json.dumps(results[1].to_dict()))
    assert as_json["errors"] == [{"row": 20, "column": "c", "reason": "missing value"}]
    assert results[1].errors == [RowError(20, "c", "missing value")]


def test_fail_fast_raises_at_the_first_bad_row(tmp_path, model, bad_csv):
    options = BatchOptions(error_policy="fail_fast")
    total, chunks = plan_chunks(bad_csv, "csv", 16, tmp_path)
    with pytest.raises(RowFailure) as failure:
        score_chunk(bad_csv, chunks[0], model, FEATURES, None, None, options, tmp_path / "0.arrow")
    assert (failure.value.row, failure.value.column, failure.value.reason) == (3, "b", "'abc' is not a number")
    assert str(pickle.loads(pickle.dumps(failure.value))) == "row 3, column 'b': 'abc' is not a number"
    with pytest.raises(RowFailure, match="row 20, column 'c': missing value"):
        score_chunk(bad_csv, chunks[1], model, FEATURES, None, None, options, tmp_path / "1.arrow")
    assert not (tmp_path / "0.arrow").exists()
    assert score_chunk(bad_csv, chunks[2], model, FEATURES, None, None, options, tmp_path / "2.arrow").rows == 16


def test_a_model_that_takes_missing_values_predicts_them(tmp_path, frame, bad_csv):
    tolerant = HistGradientBoostingClassifier(max_iter=5).fit(frame[FEATURES], frame.a > 0)
    output, results = run_batch(bad_csv, tolerant, tmp_path)
    assert list(np.flatnonzero(output.error.notna())) == [2]  # only the unparseable cell
    assert output.prediction.notna().sum() == 49


def test_bad_cells_far_into_the_file_are_found_per_row(tmp_path, model, monkeypatch):
    # small blocks put the int->float and number->text surprises after the types are fixed
    monkeypatch.setattr(batch_io, "STAGE_BLOCK_SIZE", 1024)
    rows = 3000
    data = pd.DataFrame({"a": np.arange(rows) % 7, "b": np.arange(rows) % 5, "c": np.ones(rows)}).astype(object)
    data.loc[2500, "a"] = 0.25
    data.loc[2700, "b"] = "n/a?"
    data.loc[2800, "c"] = "1.5.2"
    path = write_table(data, tmp_path / "late.csv")
    output, results = run_batch(path, model, tmp_path, rows_per_chunk=1000)
    assert dict(output.error.dropna()) == {2700: "b: 'n/a?' is not a number", 2800: "c: '1.5.2' is not a number"}
    assert output.loc[2500, "prediction"] == model.predict(pd.DataFrame([[0.25, 0, 1.0]], columns=FEATURES))[0]
    assert [r.rows_failed for r in results] == [0, 0, 2]
    assert [e.row for e in results[2].errors] == [2701, 2801]


def test_jsonl_with_a_text_value_in_a_number_column_fails_only_that_row(tmp_path, frame, model):
    records = frame.to_dict("records")
    records[30]["a"] = "lots"
    records[40]["c"] = 2  # int among floats
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    output, results = run_batch(path, model, tmp_path, out_fmt="jsonl", options=BatchOptions(id_column="id"))
    assert output.loc[30, "error"] == "a: 'lots' is not a number"
    assert output.error.notna().sum() == 1
    assert output.loc[40, "prediction"] == model.predict(frame.loc[[40], FEATURES].assign(c=2.0))[0]


def test_jsonl_columns_that_change_type_after_the_first_block(tmp_path, model, monkeypatch):
    monkeypatch.setattr(batch_io, "STAGE_BLOCK_SIZE", 1024)
    rows = [{"id": i, "a": None, "b": i % 3, "c": 0.5} for i in range(400)]
    rows[300]["a"] = 1.25  # null so far: the column becomes a number column
    rows[350]["b"] = 0.75  # ints so far
    path = tmp_path / "drift.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tolerant = HistGradientBoostingClassifier(max_iter=3).fit(
        pd.DataFrame({"a": [np.nan, 1.0, 2.0, 0.0] * 5, "b": [0, 1, 2, 3] * 5, "c": 0.5}), [0, 1] * 10
    )
    options = BatchOptions(id_column="id")
    output, _ = run_batch(path, tolerant, tmp_path, out_fmt="parquet", rows_per_chunk=150, options=options)
    assert list(output.id) == list(range(400)) and output.error.isna().all()
    expected = tolerant.predict(pd.DataFrame(rows)[["a", "b", "c"]].astype(float))
    assert list(output.prediction) == list(expected)


def test_missing_feature_or_id_columns_are_user_errors(tmp_path, frame, model):
    path = write_table(frame.drop(columns=["b"]), tmp_path / "upload.csv")
    with pytest.raises(TabularError, match="lacks the model's feature columns: 'b'"):
        run_batch(path, model, tmp_path)
    with pytest.raises(TabularError, match="id column 'key' is not in the file"):
        run_batch(path, model, tmp_path, options=BatchOptions(id_column="key"))
    with pytest.raises(TabularError, match="takes 4 features but the file has 2 columns besides the id column"):
        run_batch(path, model, tmp_path, features=None, n_features=4, options=BatchOptions(id_column="id"))


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "the file is empty"),
        ("header.csv", b"a,b,c\n", "the file has a header but no rows"),
        ("header_blank.csv", b"a,b,c\n\n\n", "the file has a header but no rows"),
        ("empty.jsonl", b"\n  \n", "the file is empty"),
    ],
)
def test_empty_and_header_only_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    fmt = detect_format(path, name)
    with pytest.raises(TabularError, match=message):
        read_columns(path, fmt)
    with pytest.raises(TabularError, match=message):
        plan_chunks(path, fmt, 10, tmp_path / "work")


def test_malformed_or_non_utf8_csv_is_refused_with_a_reason(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(TabularError, match="malformed.*Expected 2 columns, got 3"):
        plan_chunks(ragged, "csv", 10, tmp_path / "work")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("name,a\nJosé,1\n".encode("latin-1"))
    with pytest.raises(TabularError, match="not UTF-8"):
        read_columns(latin1, "csv")
    with pytest.raises(TabularError, match="not UTF-8"):
        plan_chunks(latin1, "csv", 10, tmp_path / "work")


def test_parquet_without_rows_is_refused(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), path)
    with pytest.raises(TabularError, match="no rows"):
        read_columns(path, "parquet")
    with pytest.raises(TabularError, match="no rows"):
        plan_chunks(path, "parquet", 10, tmp_path / "work")


def test_read_columns_reads_each_format(tmp_path, frame):
    for fmt in FORMATS:
        assert read_columns(write_table(frame, tmp_path / f"x.{fmt}"), fmt) == ["id", *FEATURES]
    semicolons = tmp_path / "semi.csv"
    semicolons.write_text("id;a;b\n1;2,5;3\n")
    assert read_columns(semicolons, "csv") == ["id", "a", "b"]
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("a,b,a\n1,2,3\n")
    with pytest.raises(TabularError, match="duplicate column names: 'a'"):
        read_columns(duplicated, "csv")


def test_format_is_detected_from_the_name_else_the_content(tmp_path, frame):
    upload = tmp_path / "upload"  # a stored upload has no extension
    assert detect_format(upload, "scores.NDJSON") == "jsonl"
    assert detect_format(upload, "x.pq") == "parquet"
    for fmt in FORMATS:
        write_table(frame, tmp_path / f"t.{fmt}").rename(upload)
        assert detect_format(upload, None) == fmt
        assert detect_format(upload, "data.bin") == fmt
    upload.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(TabularError, match="unrecognised"):
        detect_format(upload, "book.xlsx")
    upload.write_bytes(b"  \n")
    with pytest.raises(TabularError, match="empty"):
        detect_format(upload, None)


def test_rerunning_a_chunk_overwrites_its_output(tmp_path, frame, model):
    path = write_table(frame, tmp_path / "upload.csv")
    options = BatchOptions(id_column="id")
    _, chunks = plan_chunks(path, "csv", 16, tmp_path / "work", id_column="id")
    outputs = [tmp_path / "work" / f"chunk-{c.index}.arrow" for c in chunks]
    for chunk, out in zip(chunks, outputs):
        score_chunk(path, chunk, model, FEATURES, None, None, options, out)
    # a killed worker left a temporary file behind; the retry writes the chunk again
    (outputs[1].parent / f".{outputs[1].name}.999.dead.tmp").write_bytes(b"half a file")
    again = ChunkSpec.from_dict(json.loads(json.dumps(chunks[1].to_dict())))
    score_chunk(path, again, model, FEATURES, None, None, options, outputs[1])
    assemble(outputs, tmp_path / "scored.csv", "csv")
    output = read_output(tmp_path / "scored.csv", "csv")
    assert list(output.id) == list(frame.id)  # every row exactly once, in order


def test_jsonl_output_is_valid_json_for_awkward_values(tmp_path, model):
    awkward = ['quote " and \\ backslash', "line\nbreak\ttab", "nul\x00 bell\x07", "naïve ☃ 𝄞", None]
    data = pd.DataFrame({"id": awkward, "a": [1.0, 2.0, 3.0, 4.0, 5.0], "b": 0.5, "c": -1.0})
    path = write_table(data, tmp_path / "upload.parquet")
    options = BatchOptions(id_column="id", include_input=True)
    output, _ = run_batch(path, model, tmp_path, out_fmt="jsonl", options=options)
    assert list(output.id) == awkward
    assert list(output.a) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert output.error.isna().all()


def test_records_round_trip_through_json():
    options = BatchOptions(include_input=True, id_column="k", error_policy="fail_fast")
    assert BatchOptions.from_dict(json.loads(json.dumps(options.to_dict())) | {"future": 1}) == options
    result = ChunkResult(10, 1, [RowError(4, "a", "missing value")])
    assert ChunkResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(TabularError, match="error_policy"):
        BatchOptions(error_policy="ignore")
