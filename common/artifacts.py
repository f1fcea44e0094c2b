"""Uploaded model files: validation, the server-side allowlist, and metadata.

An uploaded pickle or joblib file can run arbitrary code when it is loaded, and even
a .skops file can carry content that crashes scikit-learn's compiled code. So every
upload is opened first in a throwaway sandbox subprocess (``sandbox_child.py``) that
converts it to skops; this process only ever loads skops bytes that the sandbox wrote,
trusting nothing but the allowlist below, and checks the node arrays of the tree types
skops itself cannot vouch for.

scikit-learn and skops are imported inside functions: the sandbox child loads this
module before it unpickles anything, and must start in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, NoReturn


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 1024 * 1024 * 1024  # RLIMIT_AS for the child
    cpu_seconds: int = 20
    wall_seconds: float = 30.0


@dataclass(frozen=True)
class ModelMetadata:
    estimator_class: str
    task_kind: str
    n_features_in: int | None
    feature_names: list[str] | None
    feature_kinds: list[str] | None
    classes: list | None
    has_predict_proba: bool
    sklearn_version: str

    def to_dict(self) -> dict:
        """The metadata as a JSON-safe dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ValidatedArtifact:
    skops_bytes: bytes
    metadata: ModelMetadata
    upload_format: str


class ArtifactRejected(Exception):
    """The upload is not a model InferQ will serve; str(exc) is a clear, user-facing reason."""


SUPPORTED_EXTENSIONS = {".skops": "skops", ".joblib": "joblib", ".pkl": "pickle", ".pickle": "pickle"}

SANDBOX_CHILD = Path(__file__).resolve().with_name("sandbox_child.py")

# --------------------------------------------------------------------------------------
# The allowlist. skops already trusts plain data, numpy arrays and ufuncs, and the public
# scikit-learn estimators; what it reports as untrusted is allowed only if it is named
# here. The lists come from persisting every estimator of sklearn.utils.all_estimators().

# scikit-learn classes that are not estimators but that fitted estimators carry.
_SKLEARN_INTERNALS = frozenset(
    {
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.cluster._bisect_k_means._BisectingTree",
        "sklearn.compose._column_transformer.make_column_selector",
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
        "sklearn.utils._bunch.Bunch",
        # Compiled code indexes their node arrays without bounds checks, so skops
        # refuses them by default; _check_tree_content validates them after each load.
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }
)
# Modules whose classes are all loss, link or kernel parameter holders.
_SKLEARN_INTERNAL_MODULES = frozenset(
    {
        "sklearn._loss.loss",
        "sklearn._loss.link",
        "sklearn._loss._loss",
        "sklearn.linear_model._sgd_fast",
        "sklearn.gaussian_process.kernels",
    }
)
# Never loaded, whatever they hold: test helpers, vendored code, dataset downloaders.
_SKLEARN_EXCLUDED_MODULES = (
    "sklearn.utils._testing",
    "sklearn.utils._mocking",
    "sklearn.externals",
    "sklearn.datasets",
)
# Plain functions that scikit-learn estimators hold as default parameters; all pure
# numerical code. Any other function (a user's, eval, ...) is refused.
_REVIEWED_FUNCTIONS = frozenset(
    {
        "numpy.mean",
        "sklearn.cluster._kmeans._kmeans_single_elkan",
        "sklearn.cluster._kmeans._kmeans_single_lloyd",
        "sklearn.feature_selection._mutual_info.mutual_info_classif",
        "sklearn.feature_selection._mutual_info.mutual_info_regression",
        "sklearn.feature_selection._univariate_selection.chi2",
        "sklearn.feature_selection._univariate_selection.f_classif",
        "sklearn.feature_selection._univariate_selection.f_regression",
        "sklearn.feature_selection._univariate_selection.r_regression",
        "sklearn.utils.validation.check_array",
    }
)
# functools.partial is safe to allow: the function it wraps is checked on its own.
_DATA_TYPES = frozenset({"numpy.dtype", "functools.partial"})

# What a pickle of a fitted estimator needs besides the above (the sandbox's tripwire).
_PICKLE_BASICS = frozenset(
    {
        *(f"builtins.{name}" for name in (
            "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset",
            "int", "list", "object", "set", "slice", "str", "tuple",
        )),
        "_codecs.encode",
        "collections.OrderedDict",
        "collections.defaultdict",
        "copyreg._reconstructor",
        "functools.partial",
        "joblib.numpy_pickle.NumpyArrayWrapper",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
        "numpy._core.numeric._frombuffer",
        "numpy.core.numeric._frombuffer",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
    }
)


def is_allowlisted_type(type_name: str) -> bool:
    """Whether a type or function that a skops file names may be loaded."""
    if type_name in _REVIEWED_FUNCTIONS or type_name in _DATA_TYPES:
        return True
    module, _, name = type_name.rpartition(".")
    if module.startswith("scipy.sparse"):
        return _is_sparse_container(_resolve(module, name))
    if module.startswith("sklearn."):
        return _is_reviewed_sklearn_class(module, name)
    return False


def pickle_global_allowed(module: str, name: str) -> bool:
    """Whether the sandbox's unpickler may resolve the global ``module.name``."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if not all(part.isidentifier() for part in module.split(".")) or not name.isidentifier():
        return False
    qualname = f"{module}.{name}"
    if qualname in _PICKLE_BASICS or qualname in _REVIEWED_FUNCTIONS:
        return True
    if module == "numpy" or module.startswith("numpy.random."):
        return _is_numpy_value_type(_resolve(module, name))
    if module.startswith("scipy.sparse"):
        return _is_sparse_container(_resolve(module, name))
    if module.startswith("sklearn.") and not _is_excluded(module):
        # Cython's pickle helpers only rebuild an instance of the type passed to them.
        if name.startswith("__pyx_unpickle_") and module in _SKLEARN_INTERNAL_MODULES:
            return True
        return _is_reviewed_sklearn_class(module, name)
    return False


def _resolve(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _is_excluded(module: str) -> bool:
    return module.startswith(_SKLEARN_EXCLUDED_MODULES) or ".tests" in module


def _is_reviewed_sklearn_class(module: str, name: str) -> bool:
    if _is_excluded(module):
        return False
    cls = _resolve(module, name)
    if not isinstance(cls, type) or not cls.__module__.startswith("sklearn."):
        return False
    if _is_excluded(cls.__module__):
        return False
    from sklearn.base import BaseEstimator

    return (
        issubclass(cls, BaseEstimator)
        or f"{cls.__module__}.{cls.__qualname__}" in _SKLEARN_INTERNALS
        or cls.__module__ in _SKLEARN_INTERNAL_MODULES
    )


def _is_numpy_value_type(obj: Any) -> bool:
    import numpy as np

    if isinstance(obj, np.ufunc):
        return True
    value_types = (np.generic, np.random.BitGenerator, np.random.SeedSequence,
                   np.random.RandomState, np.random.Generator)
    return isinstance(obj, type) and issubclass(obj, value_types)


def _is_sparse_container(obj: Any) -> bool:
    import scipy.sparse

    return isinstance(obj, type) and issubclass(obj, (scipy.sparse.spmatrix, scipy.sparse.sparray))


# --------------------------------------------------------------------------------------
# Loading skops bytes


def load_trusted(data: bytes | Path):
    """Load skops bytes trusting only the server-side allowlist, then check tree content."""
    import skops.io

    raw = data.read_bytes() if isinstance(data, Path) else bytes(data)
    try:
        found = skops.io.get_untrusted_types(data=raw)
    except MemoryError:
        raise  # the sandbox reports its memory limit; a compressed array can hide gigabytes
    except Exception as exc:
        raise ArtifactRejected(f"not a valid skops file ({_brief(exc)})") from None
    refused = [name for name in found if not is_allowlisted_type(name)]
    if refused:
        raise ArtifactRejected(f"the model contains types InferQ does not allow: {', '.join(refused)}")
    try:
        estimator = skops.io.loads(raw, trusted=found)
    except MemoryError:
        raise
    except Exception as exc:
        raise ArtifactRejected(f"the skops file could not be loaded ({_brief(exc)})") from None
    _check_tree_content(estimator)
    return estimator


def to_skops(estimator) -> bytes:
    """The estimator in the skops format (run inside the sandbox)."""
    import skops.io

    try:
        return skops.io.dumps(estimator)
    except MemoryError:
        raise
    except Exception as exc:
        raise ArtifactRejected(f"the model cannot be converted to the skops format ({_brief(exc)})") from None


def check_estimator(obj) -> None:
    """Refuse anything that is not a fitted scikit-learn estimator InferQ can call."""
    if "sklearn.base" not in sys.modules:  # nothing in the file referred to scikit-learn
        raise ArtifactRejected(f"not a scikit-learn estimator: {type(obj).__name__}")
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(obj, BaseEstimator) or not hasattr(obj, "fit") or not (
        hasattr(obj, "predict") or hasattr(obj, "transform")
    ):
        raise ArtifactRejected(f"not a scikit-learn estimator: {type(obj).__name__}")
    try:
        check_is_fitted(obj)
    except NotFittedError:
        raise ArtifactRejected(f"the {type(obj).__name__} in the file is not fitted") from None


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# Tree content: node indices must stay inside their arrays, or predict() reads wild memory.


def _check_tree_content(estimator) -> None:
    """Check every tree in the model; a Tree or TreePredictor no check reached is refused."""
    from sklearn.ensemble import BaseEnsemble
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import BaseHistGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.tree import BaseDecisionTree
    from sklearn.tree._tree import Tree

    parts = list(_walk(estimator))
    checked: set[int | None] = set()
    for part in parts:
        if isinstance(part, BaseDecisionTree):
            checked.add(_check_decision_tree(part))
        elif isinstance(part, BaseHistGradientBoosting):
            checked.update(_check_hist_gradient_boosting(part))
        elif isinstance(part, BaseEnsemble) and hasattr(part, "estimators_"):
            _check_tree_ensemble(part)
    for part in parts:
        if isinstance(part, (Tree, TreePredictor)) and id(part) not in checked:
            raise ArtifactRejected(f"the model holds a {type(part).__name__} outside the estimator that uses it")


def _walk(root) -> Iterator[Any]:
    """Every object reachable from root through attributes, containers and object arrays."""
    import numpy as np

    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            if obj.dtype == object:
                stack.extend(obj.ravel().tolist())
        elif hasattr(obj, "__dict__") and not isinstance(obj, ModuleType):
            stack.extend(vars(obj).values())


def _reject_tree(kind: str, why: str) -> NoReturn:
    raise ArtifactRejected(f"the model's {kind} is malformed: {why}")


def _check_decision_tree(model) -> int | None:
    """Check the Tree behind a fitted DecisionTree*; return its id."""
    import numpy as np
    from sklearn.tree._tree import Tree

    if not hasattr(model, "tree_"):
        return None  # an unfitted template, such as a forest's estimator_
    tree = model.tree_
    if not isinstance(tree, Tree):
        _reject_tree("decision tree", "tree_ is not a Tree")
    n = tree.node_count
    if n < 1 or n != tree.capacity or tree.n_features != getattr(model, "n_features_in_", None):
        _reject_tree("decision tree", "node count or feature count does not match")
    nodes = tree.__getstate__()["nodes"]
    left, right, feature = nodes["left_child"], nodes["right_child"], nodes["feature"]
    index = np.arange(n)
    leaf = left == -1
    inner = ~leaf
    ok = (right[leaf] == -1).all() and _children_ok(index[inner], left[inner], right[inner], n)
    ok = ok and ((feature[inner] >= 0) & (feature[inner] < tree.n_features)).all()
    if not ok:
        _reject_tree("decision tree", "a node points outside the tree")
    return id(tree)


def _children_ok(index, left, right, n) -> bool:
    """Children come after their parent (so walks end) and inside the node array."""
    return bool(((left > index) & (left < n) & (right > index) & (right < n)).all())


def _check_tree_ensemble(ensemble) -> None:
    """Forests, isolation forests and gradient boosting call their trees' compiled code directly."""
    from sklearn.ensemble import IsolationForest
    from sklearn.ensemble._forest import BaseForest
    from sklearn.ensemble._gb import BaseGradientBoosting

    if not isinstance(ensemble, (BaseForest, IsolationForest, BaseGradientBoosting)):
        return  # other ensembles call each estimator's public, input-checking methods
    trees = ensemble.estimators_
    if isinstance(ensemble, BaseGradientBoosting):
        _check_boosting_shape(ensemble, trees)
        trees = trees.ravel().tolist()
    subsets = getattr(ensemble, "estimators_features_", None)  # IsolationForest's feature subsets
    for i, tree in enumerate(trees):
        width = len(subsets[i]) if subsets is not None else ensemble.n_features_in_
        if getattr(tree, "n_features_in_", None) != width:
            _reject_tree("tree ensemble", "a tree expects a different number of features")


def _check_boosting_shape(model, trees) -> None:
    """predict_stages adds tree k's output into column k of the initial raw predictions."""
    import numpy as np

    try:
        probe = np.zeros((1, model.n_features_in_), dtype=np.float32)
        width = model._raw_predict_init(probe).shape[1]
    except Exception:
        _reject_tree("gradient boosting model", "its initial estimator cannot predict")
    if not isinstance(trees, np.ndarray) or trees.dtype != object or trees.ndim != 2 or trees.shape[1] != width:
        _reject_tree("gradient boosting model", "the trees do not match its outputs")


def _check_hist_gradient_boosting(model) -> list[int]:
    """Check every TreePredictor of a HistGradientBoosting*; return their ids."""
    import numpy as np

    n_features = model.n_features_in_
    is_categorical = np.asarray(model._bin_mapper.is_categorical_)
    if is_categorical.shape != (n_features,):
        _reject_tree("gradient boosting model", "categorical mask does not match the features")
    _check_hgb_preprocessor(model, n_features)
    ids = []
    for predictor in (p for row in model._predictors for p in row):
        _check_tree_predictor(predictor, n_features, is_categorical.astype(bool))
        ids.append(id(predictor))
    return ids


def _check_tree_predictor(predictor, n_features: int, is_categorical) -> None:
    import numpy as np
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    nodes = predictor.nodes
    if not isinstance(nodes, np.ndarray) or nodes.dtype != PREDICTOR_RECORD_DTYPE or nodes.ndim != 1 or not len(nodes):
        _reject_tree("gradient boosting model", "unexpected node array")
    bitsets = (predictor.raw_left_cat_bitsets, predictor.binned_left_cat_bitsets)
    if any(not isinstance(b, np.ndarray) or b.ndim != 2 or b.shape[1] != 8 or b.dtype != np.uint32 for b in bitsets):
        _reject_tree("gradient boosting model", "unexpected category bitsets")
    index = np.arange(len(nodes))
    inner = nodes["is_leaf"] == 0
    feature = nodes["feature_idx"][inner]
    ok = _children_ok(index[inner], nodes["left"][inner], nodes["right"][inner], len(nodes))
    ok = ok and ((feature >= 0) & (feature < n_features)).all()
    categorical = inner & (nodes["is_categorical"] != 0)
    if ok and categorical.any():
        ok = (nodes["bitset_idx"][categorical] < min(len(b) for b in bitsets)).all()
        ok = ok and is_categorical[nodes["feature_idx"][categorical]].all()
    if not ok:
        _reject_tree("gradient boosting model", "a node points outside the tree")


def _check_hgb_preprocessor(model, n_features: int) -> None:
    """The categorical pre-encoder must hand the predictors exactly n_features columns."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OrdinalEncoder

    pre = getattr(model, "_preprocessor", None)
    if pre is None:
        return
    if not isinstance(pre, ColumnTransformer):
        _reject_tree("gradient boosting model", "unexpected preprocessor")
    width = 0
    for _, step, columns in pre.transformers_:
        if step == "drop":
            continue
        if step != "passthrough" and not isinstance(step, OrdinalEncoder):
            _reject_tree("gradient boosting model", "unexpected preprocessor step")
        try:
            width += np.arange(n_features)[columns].size
        except (IndexError, TypeError, ValueError):
            _reject_tree("gradient boosting model", "preprocessor columns out of range")
    if width != n_features:
        _reject_tree("gradient boosting model", "preprocessor output width does not match")


# --------------------------------------------------------------------------------------
# Metadata


def describe(estimator) -> ModelMetadata:
    """What a fitted estimator expects and returns, for the model's record."""
    import sklearn

    n_features = getattr(estimator, "n_features_in_", None)
    names = getattr(estimator, "feature_names_in_", None)
    names = [str(name) for name in names] if names is not None else None
    return ModelMetadata(
        estimator_class=_public_class_name(type(estimator)),
        task_kind=_task_kind(estimator),
        n_features_in=int(n_features) if n_features is not None else None,
        feature_names=names,
        feature_kinds=_feature_kinds(estimator, n_features, names),
        classes=_json_classes(getattr(estimator, "classes_", None)),
        has_predict_proba=hasattr(estimator, "predict_proba"),
        sklearn_version=sklearn.__version__,
    )


def _public_class_name(cls: type) -> str:
    """The shortest public import path of cls, e.g. sklearn.linear_model.LogisticRegression."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = ".".join(parts[:end])
        if any(part.startswith("_") for part in parts[:end]):
            break
        with contextlib.suppress(ImportError):
            if getattr(importlib.import_module(module), cls.__name__, None) is cls:
                return f"{module}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _task_kind(estimator) -> str:
    from sklearn.base import is_classifier, is_clusterer, is_regressor

    if is_classifier(estimator):
        return "classifier"
    if is_regressor(estimator):
        return "regressor"
    if is_clusterer(estimator):
        return "clusterer"
    return "transformer"


def _json_classes(classes) -> list | None:
    if classes is None:
        return None
    if isinstance(classes, list):  # multi-output: one array of labels per output
        return [_json_classes(labels) for labels in classes]
    return [_json_scalar(label) for label in classes]


def _json_scalar(value):
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _feature_kinds(estimator, n_features, names) -> list[str] | None:
    """'categorical' for columns the model encodes as categories, else 'numeric'."""
    if n_features is None:
        return None
    from sklearn.compose import ColumnTransformer

    kinds = ["numeric"] * int(n_features)
    first = _input_stage(estimator)
    if isinstance(first, ColumnTransformer):
        for _, step, columns in first.transformers_:
            if _is_categorical_step(step):
                for i in _column_positions(columns, len(kinds), names):
                    kinds[i] = "categorical"
    elif _is_categorical_step(first):
        kinds = ["categorical"] * len(kinds)
    elif getattr(first, "is_categorical_", None) is not None:  # HistGradientBoosting*
        kinds = ["categorical" if flag else "numeric" for flag in first.is_categorical_]
    return kinds


def _input_stage(estimator):
    """The step that receives the raw input: the first real step of (nested) pipelines."""
    from sklearn.pipeline import Pipeline

    while isinstance(estimator, Pipeline):
        steps = [step for _, step in estimator.steps if step not in (None, "passthrough")]
        if not steps:
            break
        estimator = steps[0]
    return estimator


def _is_categorical_step(step) -> bool:
    import numpy as np
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, TargetEncoder

    if isinstance(step, (OneHotEncoder, OrdinalEncoder, TargetEncoder)):
        return True
    if isinstance(step, Pipeline):
        return any(_is_categorical_step(inner) for _, inner in step.steps)
    # e.g. a SimpleImputer fitted on strings: the column held object/string values
    statistics = getattr(step, "statistics_", None)
    return isinstance(statistics, np.ndarray) and statistics.dtype.kind in "OUS"


def _column_positions(columns, n_features: int, names) -> list[int]:
    import numpy as np

    if isinstance(columns, str):
        columns = [columns]
    try:
        if names is not None and len(columns) and all(isinstance(c, str) for c in columns):
            return [names.index(column) for column in columns]
        return np.arange(n_features)[columns].ravel().tolist()
    except (IndexError, TypeError, ValueError):
        return []


# --------------------------------------------------------------------------------------
# The sandbox


@dataclass(frozen=True)
class SandboxRun:
    returncode: int | None  # None when the wall-clock limit killed it
    stdout: str
    stderr: str
    output: bytes | None


def sandbox_environment(home: Path) -> dict[str, str]:
    """The sandbox's whole environment: nothing inherited, so no secret can leak into it."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_in_sandbox(script: Path, source: Path, input_name: str, limits: SandboxLimits) -> SandboxRun:
    """Run ``python -I script <input> <output>`` on a copy of source, in a fresh directory, under limits."""
    workdir = Path(tempfile.mkdtemp(prefix="inferq-sandbox-"))
    try:
        child_input, output = workdir / input_name, workdir / "model.skops"
        shutil.copyfile(source, child_input)
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", str(script), str(child_input), str(output)],
                cwd=workdir,
                env=sandbox_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=partial(_apply_limits, limits),
                start_new_session=True,
            )
            returncode = _wait_or_kill(process, limits.wall_seconds)
        return SandboxRun(
            returncode=returncode,
            stdout=_tail(workdir / "stdout"),
            stderr=_tail(workdir / "stderr"),
            output=output.read_bytes() if output.is_file() else None,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _apply_limits(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec; hard limits, so the child cannot raise them.

    The web serves from threads, where preexec_fn is only safe if it takes no lock another
    thread may hold at fork time: so it makes nothing but getrlimit/setrlimit calls.
    """
    _limit(resource.RLIMIT_AS, limits.memory_bytes)
    _limit(resource.RLIMIT_CPU, limits.cpu_seconds, hard=limits.cpu_seconds + 1)
    _limit(resource.RLIMIT_FSIZE, limits.memory_bytes)  # the skops output is built in memory anyway
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_CORE, 0)


def _limit(which: int, soft: int, hard: int | None = None) -> None:
    _, current_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _wait_or_kill(process: subprocess.Popen, wall_seconds: float) -> int | None:
    try:
        return process.wait(timeout=wall_seconds)
    except subprocess.TimeoutExpired:
        return None
    finally:
        # The child leads its own process group: this also ends anything it started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, size: int = 16_384) -> str:
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - size))
        return file.read().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------
# Upload validation


def validate_upload(path: Path, filename: str, limits: SandboxLimits = SandboxLimits()) -> ValidatedArtifact:
    """Open an uploaded model file in the sandbox; return its skops artifact and metadata."""
    suffix = Path(filename or "").suffix.lower()
    upload_format = SUPPORTED_EXTENSIONS.get(suffix)
    if upload_format is None:
        allowed = ", ".join(SUPPORTED_EXTENSIONS)
        raise ArtifactRejected(f"unsupported file type '{suffix or filename or ''}': upload one of {allowed}")
    _check_size(Path(path), limits)
    if upload_format == "skops" and not zipfile.is_zipfile(path):  # reads only the zip directory
        raise ArtifactRejected("not a valid skops file (it is not a complete zip archive)")
    run = run_in_sandbox(SANDBOX_CHILD, Path(path), f"upload{suffix}", limits)
    report = _sandbox_verdict(run, limits)
    _check_plain_archive(run.output)
    estimator = load_trusted(run.output)
    check_estimator(estimator)
    metadata = describe(estimator)
    metadata = dataclasses.replace(metadata, sklearn_version=report.get("sklearn_version") or metadata.sklearn_version)
    return ValidatedArtifact(skops_bytes=run.output, metadata=metadata, upload_format=upload_format)


def _check_size(path: Path, limits: SandboxLimits) -> None:
    size = path.stat().st_size
    if size == 0:
        raise ArtifactRejected("the uploaded file is empty")
    if size > limits.memory_bytes:
        raise ArtifactRejected(f"the uploaded file is larger than {limits.memory_bytes // 2**20} MiB")


def _sandbox_verdict(run: SandboxRun, limits: SandboxLimits) -> dict:
    """The child's success report, or ArtifactRejected saying why it failed."""
    if run.returncode is None:
        raise ArtifactRejected(f"loading exceeded the time limit ({limits.wall_seconds:g} s)")
    report = _last_json_line(run.stdout)
    if run.returncode == 0 and report.get("ok") and run.output:
        return report
    if report.get("ok") is False and report.get("reason"):
        raise ArtifactRejected(str(report["reason"])[:500])
    if run.returncode == -signal.SIGXCPU:
        raise ArtifactRejected(f"loading exceeded the CPU time limit ({limits.cpu_seconds} s)")
    if run.returncode == -signal.SIGKILL:
        raise ArtifactRejected("the sandbox was killed while loading (a resource limit was exceeded)")
    if any(sign in run.stderr for sign in ("MemoryError", "Cannot allocate memory", "bad_alloc")):
        raise ArtifactRejected(f"loading exceeded the sandbox memory limit ({limits.memory_bytes // 2**20} MiB)")
    if run.returncode < 0:
        raise ArtifactRejected(f"loading crashed the sandbox ({signal.Signals(-run.returncode).name})")
    raise ArtifactRejected(f"loading failed in the sandbox (exit code {run.returncode})")


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            report = json.loads(line)
            if isinstance(report, dict):
                return report
    return {}


def _check_plain_archive(data: bytes) -> None:
    """skops.dumps writes uncompressed entries; anything else did not come from our child."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            plain = all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except zipfile.BadZipFile:
        plain = False
    if not plain:
        raise ArtifactRejected("the sandbox did not produce a valid skops file")
