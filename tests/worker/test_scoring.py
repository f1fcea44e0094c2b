"""Scoring in the worker: each row's prediction is what the model's own predict() says."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from worker.serving import ModelInfo
from worker.tasks.predictions import predict


def _info(model) -> ModelInfo:
    return ModelInfo(uuid.uuid4(), "m", "a", "s", "classifier", model.n_features_in_, None, None,
                     tuple(model.classes_.tolist()), True)


@pytest.mark.parametrize("estimator", [
    LogisticRegression(max_iter=500), RandomForestClassifier(n_estimators=15, random_state=0),
    ExtraTreesClassifier(n_estimators=15, random_state=0), DecisionTreeClassifier(random_state=0),
    # Platt-scaled probabilities disagree with SVC.predict on some of these rows (4 of 100 with two classes)
    SVC(probability=True, random_state=0),
], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.filterwarnings("ignore:The `probability` parameter was deprecated:FutureWarning")
def test_predictions_are_the_models_own_and_probabilities_its_predict_proba(estimator, n_classes):
    X, y = make_classification(n_samples=400, n_features=8, n_informative=5, n_classes=n_classes, random_state=3)
    labels = np.array(["ant", "bee", "cat", "dog"])[y]
    model = estimator.fit(X[:300], labels[:300])
    rows = np.vstack([X[300:], np.zeros((1, 8))])  # and an all-zero row

    results = predict(model, _info(model), rows.tolist())

    assert [r["predictions"][0] for r in results] == model.predict(rows).tolist()
    np.testing.assert_array_equal([r["probabilities"][0] for r in results], model.predict_proba(rows))
    assert all(r["classes"] == model.classes_.tolist() for r in results)
