"""Fuzz the whole API with schemathesis: no 5xx, nothing outside the spec, no user reaching another's objects.

A bounded run (QUICK: 50 examples per operation and phase, fixed seed, each phase once: under two minutes for
the module) is part of `make test`; `make fuzz` runs the same tests with INFERQ_FUZZ=long (LONG: 200 examples,
each run repeating its fuzzing and stateful phases for 10 minutes). See tests/fuzz_support.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_SLOT, WorkerProcess, model_file, wait_for_workers
from tests.fuzz_support import LONG, QUICK, WebServer, register, run_schemathesis, seed_objects, snapshot

BUDGET = LONG if os.environ.get("INFERQ_FUZZ") == "long" else QUICK
pytestmark = pytest.mark.timeout((BUDGET.max_time or 0) * 2 + 1200)


@pytest.fixture(scope="module")
def fuzz_workers(app, test_env, tmp_path_factory):
    """Real workers for this module only: tests/web, collected after this file, expects none to be running."""
    worker = WorkerProcess(test_env, "fuzz-worker", log_dir=tmp_path_factory.mktemp("fuzz-worker")).start()
    wait_for_workers(app.extensions["celery"], 1)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def server(app, test_env, fuzz_workers):
    # long polls are capped at 2s so that generated `wait` values cannot eat the time budget
    log = _workdir("web.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    web = WebServer({**test_env, "MAX_WAIT_SECONDS": "2"}, log).start()
    yield web
    web.stop()


@pytest.fixture(scope="module")
def accounts(server, iris_model):
    alice, bob = register(server.url, "alice"), register(server.url, "bob")
    data, _ = model_file(iris_model[0])
    seed_objects(server.url, alice, data.getvalue(), n_features=4)
    return {"alice": alice, "bob": bob}


def _workdir(name: str) -> Path:
    """Reports outlive pytest's temporary directories: var/fuzz/slot<N>/<run>/ (output.txt, report/)."""
    return ROOT / "var" / "fuzz" / f"slot{TEST_SLOT}" / name


def _failed(result, server) -> str:
    errors = "\n".join(server.errors()[-20:])
    return f"schemathesis exited {result.returncode}:\n{result.output[-12000:]}\n\nserver errors:\n{errors}"


def test_another_user_never_reaches_the_owners_objects(server, accounts):
    """Bob sends every request with alice's ids, names and references: none succeeds, nothing of hers changes."""
    alice = accounts["alice"]
    before = snapshot(server.url, alice)
    result = run_schemathesis(server.url, _workdir("intruder"), BUDGET, accounts, user="bob", probability=1.0,
                              phases=["examples", "coverage", "fuzzing"], intruder_of=alice)
    print(f"intruder run: {result.seconds:.0f}s")
    assert result.returncode == 0, _failed(result, server)
    assert snapshot(server.url, alice) == before


def test_owner_run_passes_every_check(server, accounts):
    """Alice fuzzes every operation, her own ids mixed in, every phase and check (bob is the peer for OLA)."""
    result = run_schemathesis(server.url, _workdir("owner"), BUDGET, accounts, user="alice", probability=0.5,
                              phases=["examples", "coverage", "fuzzing", "stateful"])
    print(f"owner run: {result.seconds:.0f}s")
    assert result.returncode == 0, _failed(result, server)
    assert not server.errors(), "\n".join(server.errors()[-20:])


def test_the_cross_user_check_flags_a_leak(tmp_path, monkeypatch):
    """The check the intruder run relies on fails a success on the owner's id and a 2xx showing one."""
    import json
    from types import SimpleNamespace

    from tests import fuzz_hooks

    owner = {"model_id": "m-1", "model_name": "iris", "alias": "production", "job_id": "j-1", "batch_id": "b-1",
             "key_id": "k-1", "api_key": "iq_secret"}
    (tmp_path / "owner.json").write_text(json.dumps(owner))
    monkeypatch.setenv("INFERQ_FUZZ_OWNER_OBJECTS", str(tmp_path / "owner.json"))
    fuzz_hooks._owner.cache_clear()

    def check(method, path, status, text="{}", query=None, body=None):
        case = SimpleNamespace(method=method, formatted_path=path, path_parameters={}, query=query or {}, body=body)
        return fuzz_hooks.no_cross_user_access(None, SimpleNamespace(status_code=status, text=text), case)

    try:
        assert check("GET", "/api/v1/jobs/j-1", 404) is None
        assert check("GET", "/api/v1/models/by-name/iris/aliases", 200, "[]") is None
        assert check("GET", "/api/v1/jobs", 200, '{"items": []}', query={"model_id": "m-1"}) is None
        for args in [("GET", "/api/v1/jobs/j-1", 200), ("DELETE", "/api/v1/auth/api-keys/k-1", 204, ""),
                     ("GET", "/api/v1/jobs", 200, '{"items": [{"model_id": "m-1"}]}'),
                     ("POST", "/api/v1/batches", 202, "{}", None, {"model": "m-1"})]:
            with pytest.raises(AssertionError):
                check(*args)
    finally:
        fuzz_hooks._owner.cache_clear()


def test_only_gunicorns_refusals_and_nul_values_are_filtered():
    import json
    from types import SimpleNamespace

    from tests import fuzz_hooks

    def keeps(status, content_type, body, checks=("status_code_conformance",)):
        response = SimpleNamespace(status_code=status, headers={"content-type": [content_type]},
                                   json=lambda: json.loads(body))
        return fuzz_hooks.filter_failure(None, SimpleNamespace(checks=checks), None, response)

    nul = json.dumps({"error": {"code": "unstorable_value", "message": "... cannot contain NUL (0x00) bytes"}})
    assert not keeps(400, "text/html", "<html>Request Line is too large</html>")
    assert keeps(400, "application/json", '{"error": {"code": "bad_request", "message": "x"}}')
    assert keeps(500, "text/html", "<html>Internal Server Error</html>")
    assert not keeps(422, "application/json", nul, checks=("positive_data_acceptance",))
    assert keeps(422, "application/json", nul.replace("NUL", "range"), checks=("positive_data_acceptance",))
    assert keeps(422, "application/json", nul, checks=("status_code_conformance",))
