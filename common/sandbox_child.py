"""Open one uploaded model file inside InferQ's throwaway sandbox and convert it to skops.

common.artifacts runs this as ``python -I sandbox_child.py <input> <output>`` in an empty
directory, with an environment free of secrets and with resource limits set. It prints
one JSON line: ``{"ok": true, "sklearn_version": ...}`` after writing the skops bytes to
<output>, or ``{"ok": false, "reason": ...}``.

The unpickler here is a tripwire, not the main defence (the sandbox is): it refuses any
global off the allowlist in common/artifacts.py, and is installed for the whole process
so that it also guards the nested ``pickle.load`` joblib runs for object-dtype arrays.
This process is thrown away afterwards, so patching the pickle module is fine.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import resource
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace


def _load_artifacts_module():
    """common/artifacts.py by path: -I keeps the project off sys.path, and only this file is needed."""
    spec = importlib.util.spec_from_file_location("inferq_artifacts", Path(__file__).with_name("artifacts.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


artifacts = _load_artifacts_module()


class ForbiddenGlobal(Exception):
    """The pickle asked for a global that is not on the allowlist."""


def _guarded(find_class):
    def find_allowlisted_class(self, module: str, name: str):
        if not artifacts.pickle_global_allowed(module, name):
            raise ForbiddenGlobal(f"{module}.{name}")
        return find_class(self, module, name)

    return find_allowlisted_class


class TripwireUnpickler(pickle.Unpickler):
    find_class = _guarded(pickle.Unpickler.find_class)


def install_tripwire() -> None:
    """Make every unpickler of this process refuse globals off the allowlist."""
    pickle.Unpickler = TripwireUnpickler
    pickle.load = lambda file, **kwargs: TripwireUnpickler(file, **kwargs).load()
    pickle.loads = lambda data, /, **kwargs: TripwireUnpickler(io.BytesIO(data), **kwargs).load()
    # joblib's NumpyUnpickler (and pickle._load) subclass the pure-Python unpickler.
    pickle._Unpickler.find_class = _guarded(pickle._Unpickler.find_class)


@contextmanager
def recording_sklearn_version() -> Iterator[SimpleNamespace]:
    """Yield a namespace whose ``version`` is, after the block, the sklearn version of what it loaded."""
    found = SimpleNamespace(version=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
    # Matched by name so that files which never import sklearn do not pay for importing it.
    for warning in caught:
        if type(warning.message).__name__ == "InconsistentVersionWarning":
            found.version = str(warning.message.original_sklearn_version)
            break
    else:
        sklearn = sys.modules.get("sklearn")
        found.version = sklearn.__version__ if sklearn else None


def open_model(path: Path):
    """The object stored in path, by its extension (the parent named the copy)."""
    if path.suffix == ".skops":
        return artifacts.load_trusted(path)
    if path.suffix == ".joblib":
        import joblib

        return joblib.load(path)
    with path.open("rb") as file:
        return pickle.load(file)


def convert(source: Path, target: Path) -> str:
    """Load source, check it, write it to target as skops; return its sklearn version."""
    with recording_sklearn_version() as recorded:
        estimator = open_model(source)
    artifacts.check_estimator(estimator)
    data = artifacts.to_skops(estimator)
    artifacts.load_trusted(data)  # the parent loads this next: let it crash here if anything
    target.write_bytes(data)
    return recorded.version


def failure_reason(exc: BaseException, source: Path) -> str:
    if isinstance(exc, ForbiddenGlobal):
        return f"model file tried to load forbidden global '{exc}'"
    if isinstance(exc, artifacts.ArtifactRejected):
        return str(exc)
    if isinstance(exc, MemoryError):
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        return f"loading exceeded the sandbox memory limit ({limit // 2**20} MiB)"
    if isinstance(exc, RecursionError):
        return "the model file is nested too deeply to load"
    kind = artifacts.SUPPORTED_EXTENSIONS.get(source.suffix, "model")
    return f"the file could not be read as a {kind} file ({artifacts._brief(exc)})"


def main(argv: list[str]) -> int:
    source, target = Path(argv[1]), Path(argv[2])
    install_tripwire()
    try:
        version = convert(source, target)
    except Exception as exc:  # MemoryError and RecursionError are Exceptions too
        print(json.dumps({"ok": False, "reason": failure_reason(exc, source)}), flush=True)
        return 1
    print(json.dumps({"ok": True, "sklearn_version": version}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
