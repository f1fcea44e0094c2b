"""Benchmark baseline: score a CSV in one process with plain pyarrow + scikit-learn.

Usage: python bench/baseline_pyarrow.py MODEL.joblib INPUT.csv OUTPUT.csv
Prints {"rows": ..., "seconds": ..., "rows_per_s": ...} as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv


def score_csv(model, input_path: str, output_path: str) -> int:
    """Read the whole CSV, append prediction and proba_<class> columns, write CSV."""
    table = pacsv.read_csv(input_path)
    names = list(getattr(model, "feature_names_in_", table.column_names[: model.n_features_in_]))
    matrix = np.column_stack([table.column(name).to_numpy() for name in names])
    if hasattr(model, "feature_names_in_"):
        import pandas as pd

        matrix = pd.DataFrame(matrix, columns=names)
    table = table.append_column("prediction", pa.array(model.predict(matrix)))
    if hasattr(model, "predict_proba"):
        for cls, column in zip(model.classes_, model.predict_proba(matrix).T):
            table = table.append_column(f"proba_{cls}", pa.array(column))
    pacsv.write_csv(table, output_path)
    return table.num_rows


def main(argv: list[str]) -> None:
    model_path, input_path, output_path = argv
    # the model load is not part of what is measured, as in the batch path
    model = joblib.load(model_path)
    started = time.perf_counter()
    rows = score_csv(model, input_path, output_path)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}))


if __name__ == "__main__":
    main(sys.argv[1:])
