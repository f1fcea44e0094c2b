"""Synthetic data for the batch-scoring benchmark and tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from sklearn.linear_model import LogisticRegression

CLASSES = ("high", "low", "mid")
FIT_SAMPLE_ROWS = 20_000
WRITE_BATCH_ROWS = 100_000


def make_classification_csv(
    path: Path | str, rows: int, cols: int = 30, seed: int = 0
) -> tuple[LogisticRegression, list[str]]:
    """Write a `rows` x `cols` CSV (f0..f{cols-1}) and return a model fitted on a sample of it."""
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(cols)]
    weights = rng.standard_normal((cols, len(CLASSES)))
    schema = pa.schema([(name, pa.float64()) for name in names])
    sample_x, sample_y = [], []
    with pacsv.CSVWriter(str(path), schema) as writer:
        for start in range(0, rows, WRITE_BATCH_ROWS):
            # three decimals keep the file near 7 bytes a value (~200 MB for 1M x 30)
            x = np.round(rng.standard_normal((min(WRITE_BATCH_ROWS, rows - start), cols)), 3)
            writer.write_table(pa.Table.from_arrays(list(x.T), schema=schema))
            if sum(len(s) for s in sample_x) < FIT_SAMPLE_ROWS:
                noise = rng.gumbel(size=(len(x), len(CLASSES)))
                sample_x.append(x)
                sample_y.append(np.asarray(CLASSES)[np.argmax(x @ weights + noise, axis=1)])
    frame = pd.DataFrame(np.concatenate(sample_x)[:FIT_SAMPLE_ROWS], columns=names)
    model = LogisticRegression(max_iter=500).fit(frame, np.concatenate(sample_y)[:FIT_SAMPLE_ROWS])
    return model, names


if __name__ == "__main__":
    import sys

    import joblib

    out_csv, out_model, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    fitted, _ = make_classification_csv(out_csv, n)
    joblib.dump(fitted, out_model)
