"""Uploaded model files: real models round-trip through the sandbox; hostile files are refused.

Everything here runs the real sandbox subprocess on real files; nothing is mocked.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
import skops.io
from numpy._core.multiarray import _reconstruct
from sklearn.calibration import CalibratedClassifierCV
from sklearn.cluster import KMeans
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.svm import SVC

from common.artifacts import (
    ArtifactRejected,
    SandboxLimits,
    ValidatedArtifact,
    is_allowlisted_type,
    load_trusted,
    pickle_global_allowed,
    run_in_sandbox,
    validate_upload,
)

FORMATS = {".skops": "skops", ".joblib": "joblib", ".pkl": "pickle"}


# --- models and files --------------------------------------------------------------------


def _iris_frame() -> tuple[pd.DataFrame, pd.Series]:
    """Iris as a DataFrame with an extra string column, as a data scientist would train on."""
    frame = load_iris(as_frame=True).frame
    frame["size"] = np.where(frame["petal length (cm)"] > 4.0, "large", "small")
    return frame.drop(columns="target"), frame["target"]


def _train_models() -> dict[str, tuple[object, object, dict]]:
    """name -> (fitted model, inputs to predict on, expected metadata)."""
    cancer_X, cancer_y = load_breast_cancer(return_X_y=True)
    iris = load_iris()
    iris_X, iris_names = iris.data, iris.target_names[iris.target]
    diabetes_X, diabetes_y = load_diabetes(return_X_y=True)
    frame, frame_y = _iris_frame()
    numeric = [c for c in frame.columns if c != "size"]
    encode = ColumnTransformer([("num", StandardScaler(), numeric),
                                ("cat", OneHotEncoder(handle_unknown="ignore"), ["size"])])
    species = ["setosa", "versicolor", "virginica"]
    return {
        "logistic": (LogisticRegression(max_iter=5000).fit(cancer_X, cancer_y), cancer_X,
                     dict(estimator_class="sklearn.linear_model.LogisticRegression", task_kind="classifier",
                          n_features_in=30, classes=[0, 1], has_predict_proba=True)),
        "forest": (RandomForestClassifier(n_estimators=10, random_state=0).fit(iris_X, iris.target), iris_X,
                   dict(estimator_class="sklearn.ensemble.RandomForestClassifier", task_kind="classifier",
                        n_features_in=4, classes=[0, 1, 2], has_predict_proba=True)),
        "hist_gb": (HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(iris_X, iris_names), iris_X,
                    dict(estimator_class="sklearn.ensemble.HistGradientBoostingClassifier",
                         task_kind="classifier", n_features_in=4, classes=species, has_predict_proba=True)),
        "calibrated_svc": (make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(), cv=3)).fit(cancer_X, cancer_y),
                           cancer_X,
                           dict(estimator_class="sklearn.pipeline.Pipeline", task_kind="classifier",
                                n_features_in=30, classes=[0, 1], has_predict_proba=True)),
        "column_transformer": (make_pipeline(encode, LogisticRegression(max_iter=1000)).fit(frame, frame_y), frame,
                               dict(estimator_class="sklearn.pipeline.Pipeline", task_kind="classifier",
                                    n_features_in=5, feature_names=list(frame.columns),
                                    feature_kinds=["numeric"] * 4 + ["categorical"], classes=[0, 1, 2],
                                    has_predict_proba=True)),
        "ridge": (Ridge().fit(diabetes_X, diabetes_y), diabetes_X,
                  dict(estimator_class="sklearn.linear_model.Ridge", task_kind="regressor", n_features_in=10,
                       feature_names=None, feature_kinds=["numeric"] * 10, classes=None, has_predict_proba=False)),
        "kmeans": (KMeans(n_clusters=3, n_init=3, random_state=0).fit(iris_X), iris_X,
                   dict(estimator_class="sklearn.cluster.KMeans", task_kind="clusterer", n_features_in=4,
                        classes=None, has_predict_proba=False)),
    }


def _save(model, path: Path) -> Path:
    """Write model the way a user would for this extension."""
    if path.suffix == ".skops":
        skops.io.dump(model, path)
    elif path.suffix == ".joblib":
        joblib.dump(model, path)
    else:
        path.write_bytes(pickle.dumps(model))
    return path


def _pickle_file(tmp_path: Path, obj, name: str = "upload.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj))
    return path


class RunsOnLoad:
    """Pickles as a call to func(*args): what a hostile model file does when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class HugeArray:
    """Unpickles through numpy's own array reconstructor (allowlisted) into a 4 GiB array."""

    def __reduce__(self):
        return _reconstruct, (np.ndarray, (4 * 2**30,), b"b")


def add_one(X):
    return X + 1


def _hash_bomb() -> bytes:
    """A dict keyed by a 64-level tuple whose halves are shared: hashing it never ends.

    Built from pickle opcodes only, so no global is involved and only the limits can stop it.
    """
    nested: tuple = (0,)
    for _ in range(64):
        nested = (nested, nested)
    body = pickle.dumps(nested, protocol=2)  # the memo shares each level: a few hundred bytes
    return b"\x80\x02}" + body[2:-1] + b"K\x01s."  # EMPTY_DICT, key, value 1, SETITEM, STOP


def _reason(path: Path, filename: str | None = None, limits: SandboxLimits = SandboxLimits()) -> str:
    with pytest.raises(ArtifactRejected) as caught:
        validate_upload(path, filename or path.name, limits)
    reason = str(caught.value)
    assert "Traceback" not in reason and "\n" not in reason
    return reason


# --- round trips ----------------------------------------------------------------------------


# Uploads whose sandbox must import scikit-learn cost ~2 s of CPU each, so they are all
# validated together, concurrently, by the `outcomes` fixture; each builder sits by its test.
SLOW_UPLOADS: dict[str, Callable[[Path], Path]] = {}


def slow_upload(filename: str):
    def register(build: Callable[[Path], Path]):
        SLOW_UPLOADS[filename] = build
        return build

    return register


@pytest.fixture(scope="module")
def trained():
    return _train_models()


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def outcomes(trained, upload_dir) -> dict[str, ValidatedArtifact | ArtifactRejected]:
    """filename -> what validate_upload made of it, for every model in every format and SLOW_UPLOADS."""
    builders = {f"{name}{ext}": partial(_save, model, upload_dir / f"{name}{ext}")
                for name, (model, _, _) in trained.items() for ext in FORMATS}
    builders.update({filename: partial(build, upload_dir) for filename, build in SLOW_UPLOADS.items()})
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {filename: pool.submit(_outcome, build, filename) for filename, build in builders.items()}
        return {filename: future.result() for filename, future in futures.items()}


def _outcome(build: Callable[[], Path], filename: str) -> ValidatedArtifact | ArtifactRejected:
    path = build()
    try:
        return validate_upload(path, filename)
    except ArtifactRejected as rejected:
        return rejected


def _rejection(outcome) -> str:
    assert isinstance(outcome, ArtifactRejected), outcome
    reason = str(outcome)
    assert "Traceback" not in reason and "\n" not in reason
    return reason


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("name", ["logistic", "forest", "hist_gb", "calibrated_svc", "column_transformer",
                                  "ridge", "kmeans"])
def test_real_model_round_trips_with_its_metadata(name, ext, trained, outcomes):
    model, X, expected = trained[name]
    artifact = outcomes[f"{name}{ext}"]
    assert isinstance(artifact, ValidatedArtifact), artifact

    metadata = artifact.metadata.to_dict()
    assert {key: metadata[key] for key in expected} == expected
    assert artifact.upload_format == FORMATS[ext]
    assert metadata["sklearn_version"] == sklearn.__version__
    assert len(metadata["feature_kinds"]) == metadata["n_features_in"]
    json.dumps(metadata)  # stored as JSON as is

    served = load_trusted(artifact.skops_bytes)
    np.testing.assert_array_equal(served.predict(X), model.predict(X))
    if expected["has_predict_proba"]:
        np.testing.assert_allclose(served.predict_proba(X), model.predict_proba(X))


def test_load_trusted_reads_a_stored_artifact_path(outcomes, trained, tmp_path):
    stored = tmp_path / "model.skops"
    stored.write_bytes(outcomes["ridge.pkl"].skops_bytes)
    model, X, _ = trained["ridge"]
    np.testing.assert_allclose(load_trusted(stored).predict(X), model.predict(X))


@slow_upload("old-sklearn.pkl")
def _saved_by_an_older_sklearn(folder: Path) -> Path:
    X, y = load_diabetes(return_X_y=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sklearn.base, "__version__", "1.4.2")  # what BaseEstimator.__getstate__ records
        return _pickle_file(folder, Ridge().fit(X, y), "old-sklearn.pkl")


def test_the_sklearn_version_recorded_in_a_pickle_is_kept(outcomes):
    assert outcomes["old-sklearn.pkl"].metadata.sklearn_version == "1.4.2"


# --- code that runs on load -------------------------------------------------------------------


@pytest.mark.parametrize("func, args, forbidden", [
    (eval, ("__import__('os').getcwd()",), "builtins.eval"),
    (subprocess.Popen, (["true"],), "subprocess.Popen"),
    (importlib.import_module, ("os",), "importlib.import_module"),
    (getattr, ("text", "upper"), "builtins.getattr"),
])
def test_pickle_calling_a_forbidden_global_is_refused(tmp_path, func, args, forbidden):
    reason = _reason(_pickle_file(tmp_path, RunsOnLoad(func, *args)))
    assert reason == f"model file tried to load forbidden global '{forbidden}'"


def test_pickle_running_a_shell_command_never_runs_it(tmp_path):
    canary = tmp_path / "canary"
    path = _pickle_file(tmp_path, RunsOnLoad(os.system, f"touch {canary}"))

    assert _reason(path) == "model file tried to load forbidden global 'posix.system'"
    assert not canary.exists()


@slow_upload("hidden-payload.joblib")
def _payload_in_an_object_array(folder: Path) -> Path:
    X, y = load_breast_cancer(return_X_y=True)
    model = LogisticRegression(max_iter=5000).fit(X, y)
    model.notes_ = np.array([RunsOnLoad(os.system, f"touch {folder / 'joblib-canary'}")], dtype=object)
    joblib.dump(model, folder / "hidden-payload.joblib")
    return folder / "hidden-payload.joblib"


def test_payload_hidden_in_a_joblib_object_array_is_caught(outcomes, upload_dir):
    """joblib loads object-dtype arrays with a nested plain pickle.load: the tripwire guards it too."""
    reason = _rejection(outcomes["hidden-payload.joblib"])
    assert reason == "model file tried to load forbidden global 'posix.system'"
    assert not (upload_dir / "joblib-canary").exists()


# --- not a servable model ---------------------------------------------------------------------------


def test_pickle_of_a_dict_is_not_an_estimator(tmp_path):
    assert _reason(_pickle_file(tmp_path, {"coef": [1, 2, 3]})) == "not a scikit-learn estimator: dict"


def test_pickle_of_a_function_is_refused(tmp_path):
    reason = _reason(_pickle_file(tmp_path, add_one))
    assert reason.startswith("model file tried to load forbidden global") and "add_one" in reason


def _user_function_pipeline(folder: Path, ext: str) -> Path:
    X, y = load_diabetes(return_X_y=True)
    return _save(make_pipeline(FunctionTransformer(add_one), Ridge()).fit(X, y), folder / f"user-function{ext}")


slow_upload("user-function.skops")(partial(_user_function_pipeline, ext=".skops"))
slow_upload("user-function.pkl")(partial(_user_function_pipeline, ext=".pkl"))


@pytest.mark.parametrize("filename, reason", [
    ("user-function.skops", f"the model contains types InferQ does not allow: {add_one.__module__}.add_one"),
    ("user-function.pkl", f"model file tried to load forbidden global '{add_one.__module__}.add_one'"),
])
def test_function_transformer_with_a_user_function_is_refused(outcomes, filename, reason):
    assert _rejection(outcomes[filename]) == reason


@slow_upload("kd-tree.skops")
def _neighbors_with_a_kd_tree(folder: Path) -> Path:
    X, y = load_iris(return_X_y=True)
    return _save(KNeighborsClassifier(algorithm="kd_tree").fit(X, y), folder / "kd-tree.skops")


def test_skops_file_with_types_off_the_allowlist_is_refused(outcomes):
    assert _rejection(outcomes["kd-tree.skops"]) == (
        "the model contains types InferQ does not allow: "
        "sklearn.metrics._dist_metrics.EuclideanDistance64, sklearn.neighbors._kd_tree.KDTree")


@slow_upload("unfitted.pkl")
def _unfitted_model(folder: Path) -> Path:
    return _pickle_file(folder, Ridge(), "unfitted.pkl")


def test_unfitted_estimator_is_refused(outcomes):
    assert _rejection(outcomes["unfitted.pkl"]) == "the Ridge in the file is not fitted"


def _truncated(folder: Path, ext: str) -> Path:
    X, y = load_diabetes(return_X_y=True)
    data = _save(Ridge().fit(X, y), folder / f"whole{ext}").read_bytes()
    path = folder / f"truncated{ext}"
    path.write_bytes(data[: len(data) // 2])
    return path


slow_upload("truncated.joblib")(partial(_truncated, ext=".joblib"))
slow_upload("truncated.skops")(partial(_truncated, ext=".skops"))


@pytest.mark.parametrize("filename, reason", [
    ("truncated.joblib", "the file could not be read as a joblib file"),
    ("truncated.skops", "not a valid skops file"),
])
def test_truncated_file_is_refused(outcomes, filename, reason):
    assert _rejection(outcomes[filename]).startswith(reason)


@slow_upload("zip-bomb.skops")
def _skops_file_hiding_a_gigabyte(folder: Path) -> Path:
    """A valid .skops file whose one array inflates from ~1 MB to 1 GiB of zeros."""
    X, y = load_diabetes(return_X_y=True)
    original = zipfile.ZipFile(io.BytesIO(skops.io.dumps(Ridge().fit(X, y))))
    array_name = next(name for name in original.namelist() if name.endswith(".npy"))
    path = folder / "zip-bomb.skops"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bomb:
        for name in original.namelist():
            if name != array_name:
                bomb.writestr(name, original.read(name))
                continue
            with bomb.open(name, "w", force_zip64=True) as member:
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": "<f8", "fortran_order": False, "shape": (2**27,)})
                member.write(header.getvalue())
                for _ in range(64):
                    member.write(bytes(2**24))
    return path


def test_skops_decompression_bomb_is_opened_only_in_the_sandbox(outcomes):
    assert _rejection(outcomes["zip-bomb.skops"]) == "loading exceeded the sandbox memory limit (1024 MiB)"


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.joblib"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert _reason(path).startswith("the file could not be read as a joblib file")


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pkl"
    path.write_bytes(b"")
    assert _reason(path) == "the uploaded file is empty"


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("LogisticRegression()")
    assert _reason(path) == "unsupported file type '.txt': upload one of .skops, .joblib, .pkl, .pickle"


# --- resource limits ------------------------------------------------------------------------------


def test_huge_allocation_is_stopped_by_the_memory_limit(tmp_path):
    path = _pickle_file(tmp_path, HugeArray())

    assert _reason(path) == "loading exceeded the sandbox memory limit (1024 MiB)"
    # The same file under a roomier limit allocates fine: RLIMIT_AS, not the machine, stopped it.
    assert _reason(path, limits=SandboxLimits(memory_bytes=8 * 2**30)) == "not a scikit-learn estimator: ndarray"


def test_endless_loading_is_stopped_by_the_cpu_limit(tmp_path):
    path = tmp_path / "loop.pkl"
    path.write_bytes(_hash_bomb())
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=20)
    assert _reason(path, limits=limits) == "loading exceeded the CPU time limit (1 s)"


def test_endless_loading_is_stopped_by_the_wall_clock_limit(tmp_path):
    path = tmp_path / "loop.pkl"
    path.write_bytes(_hash_bomb())
    limits = SandboxLimits(cpu_seconds=20, wall_seconds=1.5)
    assert _reason(path, limits=limits) == "loading exceeded the time limit (1.5 s)"


# --- the sandbox itself -------------------------------------------------------------------------------

PROBE = """
import json, os, resource, sys
limits = {name: resource.getrlimit(getattr(resource, name))
          for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")}
report = {"env": dict(os.environ), "cwd": os.getcwd(), "limits": limits,
          "own_session": os.getsid(0) == os.getpid(), "input": open(sys.argv[1]).read(),
          "isolated": sys.flags.isolated}
open(sys.argv[2], "w").write(json.dumps(report))
"""


def test_sandbox_child_sees_no_secrets_and_runs_under_limits(tmp_path, monkeypatch):
    """A probe script in place of sandbox_child.py reports what any code in the sandbox would see."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://secret")
    monkeypatch.setenv("JWT_SECRET_KEY", "top-secret")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    upload = tmp_path / "anything.bin"
    upload.write_text("payload")
    limits = SandboxLimits(memory_bytes=512 * 2**20, cpu_seconds=7, wall_seconds=20)

    run = run_in_sandbox(probe, upload, "upload.pkl", limits)
    seen = json.loads(run.output)

    assert run.returncode == 0
    assert "secret" not in json.dumps(seen["env"])
    assert set(seen["env"]) <= {"PATH", "HOME", "LANG", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "MKL_NUM_THREADS", "LC_CTYPE"}  # LC_CTYPE: set by Python's C locale coercion
    assert seen["env"]["HOME"] == seen["cwd"] and seen["env"]["OMP_NUM_THREADS"] == "1"
    assert not Path(seen["cwd"]).exists()  # the temp dir is gone afterwards
    assert seen["input"] == "payload" and seen["own_session"] and seen["isolated"]
    assert seen["limits"]["RLIMIT_AS"] == [512 * 2**20] * 2
    assert seen["limits"]["RLIMIT_CPU"] == [7, 8]
    assert seen["limits"]["RLIMIT_FSIZE"][1] <= 512 * 2**20
    assert seen["limits"]["RLIMIT_NOFILE"][1] <= 64
    assert seen["limits"]["RLIMIT_CORE"] == [0, 0]


# --- the allowlist -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, name", [
    ("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("importlib", "import_module"),
    ("subprocess", "Popen"), ("numpy", "load"), ("numpy", "memmap"), ("numpy.testing", "assert_equal"),
    ("sklearn.utils._testing", "assert_run_python_script_without_output"),
    ("sklearn.datasets", "fetch_openml"), ("sklearn.utils", "check_random_state"),
    ("joblib.numpy_pickle_compat", "NDArrayWrapper"), ("__main__", "add_one"),
])
def test_tripwire_refuses(module, name):
    assert not pickle_global_allowed(module, name)


@pytest.mark.parametrize("module, name", [
    ("sklearn.linear_model._logistic", "LogisticRegression"), ("sklearn.tree._tree", "Tree"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy", "float64"), ("numpy", "log1p"),
    ("scipy.sparse._csr", "csr_matrix"), ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    ("__builtin__", "set"),  # protocol 0-2 pickles name builtins the Python 2 way
])
def test_tripwire_allows_what_fitted_models_need(module, name):
    assert pickle_global_allowed(module, name)


@pytest.mark.parametrize("type_name, allowed", [
    ("sklearn.calibration._CalibratedClassifier", True),
    ("sklearn.tree._tree.Tree", True),
    ("sklearn.feature_selection._univariate_selection.f_classif", True),
    ("numpy.dtype", True),
    ("builtins.eval", False),
    ("__main__.add_one", False),
    ("sklearn.neighbors._kd_tree.KDTree", False),
    ("sklearn.utils._testing.assert_run_python_script_without_output", False),
    ("sklearn.utils.check_random_state", False),
])
def test_skops_allowlist(type_name, allowed):
    assert is_allowlisted_type(type_name) is allowed


# --- content of tree models ------------------------------------------------------------------------------


def test_tree_with_a_node_outside_the_tree_is_refused():
    X, y = load_iris(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(X, y)
    tree = forest.estimators_[1].tree_
    state = tree.__getstate__()
    state["nodes"]["left_child"][0] = 10**6  # predict() would read far outside the node array
    tree.__setstate__(state)

    with pytest.raises(ArtifactRejected, match="decision tree is malformed"):
        load_trusted(skops.io.dumps(forest))


def test_gradient_boosting_node_with_an_unknown_feature_is_refused():
    X, y = load_iris(return_X_y=True)
    model = HistGradientBoostingClassifier(max_iter=2).fit(X, y)
    model._predictors[0][0].nodes["feature_idx"][0] = 40  # the model only has 4 features

    with pytest.raises(ArtifactRejected, match="gradient boosting model is malformed"):
        load_trusted(skops.io.dumps(model))
