"""API fuzzing with schemathesis against a live gunicorn: the server, two users' data, and the two runs.

Why a live server rather than schemathesis' in-process WSGI transport: the CLI (`schemathesis run`) is the
only runner that has every phase (examples, coverage, fuzzing, stateful) and every check, including
`object_level_authorization` with WFC peers; it talks HTTP. A gunicorn with the web's own worker
(gunicorn.conf.py) is also what production runs, so request parsing, body limits and concurrency are the real
ones.

Two runs, each a `schemathesis run` subprocess:
- the owner run: alice is the caller; she owns a model version, an alias, a job, a batch and an API key, and
  the generator is fed her ids (dictionaries) so reads, updates and deletes hit real objects. All checks,
  and every phase, stateful included (use-after-free, object-level authorization probes as bob).
- the intruder run: bob is the caller and every id, name and reference he sends is one of alice's. The
  `no_cross_user_access` check (tests/fuzz_hooks.py) fails any 2xx that reaches her objects or shows any
  of her ids, and afterwards alice's objects must be exactly as they were.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.conftest import PASSWORD, ROOT, free_port, stop_process_group
from tests.live import wait_until_serving

API = "/api/v1"


@dataclass(frozen=True)
class Budget:
    """How much a run fuzzes: `max_examples` per operation and phase; with `max_time` (seconds), the fuzzing and
    stateful phases repeat until that time is spent, without it each phase runs once (a fixed amount of work)."""

    max_examples: int
    max_time: int | None = None
    seed: int = 20261126
    stateful_steps: int = 10


# the bounded run inside `make test` (under a minute per run), and the longer one of `make fuzz` (10 minutes each)
QUICK = Budget(max_examples=50)
LONG = Budget(max_examples=200, max_time=600, stateful_steps=30)


class WebServer:
    """`gunicorn "web.app:create_app()"` as the Procfile runs it, on a free loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path, processes: int = 2, threads: int = 8):
        self.port, self.log_path = free_port(), log_path
        self.env = {**os.environ, **env}
        self.args = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers",
                     str(processes), "--threads", str(threads), "--timeout", "120",
                     "web.app:create_app()"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "WebServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until_serving(self.proc, self.url, self.log_path)
        return self

    def stop(self) -> None:
        stop_process_group(self.proc)

    def errors(self) -> list[str]:
        """Unhandled errors the server logged, one line each: where in InferQ's code, and the exception."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found = []
        for line in text.splitlines():
            if "Traceback" not in line:
                continue
            try:
                trace = json.loads(line).get("exc_info") or line
            except ValueError:
                trace = line
            ours = [frame.strip() for frame in trace.splitlines() if frame.strip().startswith("File") and
                    str(ROOT) in frame and "/.venv/" not in frame]
            raised = [text for text in trace.splitlines() if re.match(r"[A-Za-z_][\w.]*: ", text)]
            found.append(f"{ours[-1] if ours else '?'}: {raised[-1] if raised else trace.splitlines()[-1]}")
        return found


@dataclass
class Account:
    email: str
    password: str = PASSWORD
    token: str = ""
    objects: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _ok(response: requests.Response, *statuses: int) -> dict:
    assert response.status_code in statuses, f"{response.request.method} {response.url}: " \
                                             f"{response.status_code} {response.text[:500]}"
    return response.json() if response.content else {}


def register(base: str, label: str) -> Account:
    account = Account(email=f"fuzz-{label}-{uuid.uuid4().hex[:10]}@example.com")
    _ok(requests.post(base + API + "/auth/register", json={"email": account.email, "password": account.password},
                      timeout=30), 201)
    tokens = _ok(requests.post(base + API + "/auth/login", json={"email": account.email,
                                                                 "password": account.password}, timeout=30), 200)
    account.token = tokens["access_token"]
    return account


def _wait_until(base: str, account: Account, path: str, statuses: set[str], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = _ok(requests.get(base + path, headers=account.headers, timeout=30), 200)
        if body["status"] in statuses or time.monotonic() > deadline:
            assert body["status"] in statuses, body
            return body
        time.sleep(0.3)


def seed_objects(base: str, account: Account, model_bytes: bytes, n_features: int) -> dict[str, str]:
    """One of everything a user owns: a model version, an alias, a finished job, a batch, an API key."""
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    model = _ok(requests.post(base + API + "/models/upload", headers=account.headers, timeout=120,
                              files={"file": ("model.skops", model_bytes)}, data={"name": name}), 201)
    _ok(requests.put(f"{base}{API}/models/by-name/{name}/aliases/production", headers=account.headers,
                     json={"version": 1}, timeout=30), 200)
    row = [0.5] * n_features
    job = _ok(requests.post(f"{base}{API}/predict/{model['id']}?wait=20", headers=account.headers,
                            json={"instances": [row]}, timeout=60), 200, 202)
    _wait_until(base, account, f"{API}/jobs/{job['id']}", {"succeeded"})
    csv = "\n".join([",".join(f"f{i}" for i in range(n_features))] + [",".join(map(str, row))] * 5) + "\n"
    batch = _ok(requests.post(base + API + "/batches", headers=account.headers, timeout=60,
                              files={"file": ("rows.csv", io.BytesIO(csv.encode()))}, data={"model": model["id"]}),
                202)
    _wait_until(base, account, f"{API}/batches/{batch['id']}", {"succeeded"})
    key = _ok(requests.post(base + API + "/auth/api-keys", headers=account.headers, json={"name": "fuzz"},
                            timeout=30), 201)
    account.objects = {"model_id": model["id"], "model_name": name, "alias": "production", "job_id": job["id"],
                       "batch_id": batch["id"], "key_id": key["id"], "api_key": key["key"]}
    return account.objects


def snapshot(base: str, account: Account) -> dict:
    """What the owner sees of her objects; the intruder run must leave it unchanged."""
    o, h = account.objects, account.headers
    get = lambda path: _ok(requests.get(base + API + path, headers=h, timeout=30), 200)  # noqa: E731
    model = get(f"/models/{o['model_id']}")
    job = get(f"/jobs/{o['job_id']}")
    batch = get(f"/batches/{o['batch_id']}")
    return {
        "model": {k: model[k] for k in ("status", "description", "tags", "updated_at")},
        "aliases": get(f"/models/by-name/{o['model_name']}/aliases"),
        "job": {k: job[k] for k in ("status", "result", "finished_at")},
        "batch": {k: batch[k] for k in ("status", "rows_done", "finished_at")},
        "keys": [{n: k[n] for n in ("name", "prefix", "revoked_at")} for k in get("/auth/api-keys")
                 if k["id"] == o["key_id"]],
        "api_key_works": requests.get(base + API + "/auth/me", headers={"X-API-Key": o["api_key"]},
                                      timeout=30).status_code == 200,
    }


def _wfc_auth(accounts: dict[str, Account]) -> dict:
    """Web Fuzzing Commons auth: each user logs in through the API (and again after a 401, e.g. a logout)."""
    return {"auth": [{
        "name": name,
        "loginEndpointAuth": {
            "verb": "POST", "endpoint": API + "/auth/login", "contentType": "application/json",
            "payloadUserPwd": {"username": account.email, "password": account.password,
                               "usernameField": "email", "passwordField": "password"},
            "token": {"extractFrom": "body", "extractSelector": "/access_token", "sendIn": "header",
                      "sendName": "Authorization", "sendTemplate": "Bearer {token}"},
        },
    } for name, account in accounts.items()]}


# Where a schema-valid request can still be refused with 422 because the rule depends on content or state the
# schema cannot describe; positive_data_acceptance accepts a 422 on these operations only.
SEMANTIC_422 = {
    "POST /api/v1/auth/register": "the email must pass email_validator, the password hold a letter and a digit",
    "POST /api/v1/auth/logout": "refresh_token must be a refresh token this server issued",
    "POST /api/v1/models/upload": "the file must be a model that the sandbox validates",
    "POST /api/v1/predict/{model_ref}": "each row must fit the model's features",
    "POST /api/v1/batches": "the file must be a table holding the model's columns",
    "PUT /api/v1/models/by-name/{name}/aliases/{alias}": "alias names `latest` and `v<N>` are reserved",
    "GET /api/v1/stats": "window must lie between 1m and 30d",
    "GET /api/v1/models/{model_id}/stats": "window must lie between 1m and 30d",
}
ACCEPTED = ["2xx", "3xx", 401, 403, 404, 409, 429]
# DELETE archives a model, cancels a job or a batch, revokes an API key: the object stays readable with its
# new status (tests/web and tests/worker assert that), so use_after_free does not apply to reading them.
SOFT_DELETED_READS = [
    "GET /api/v1/models/{model_id}", "GET /api/v1/models/{model_id}/stats", "PATCH /api/v1/models/{model_id}",
    "GET /api/v1/jobs/{job_id}", "GET /api/v1/batches/{batch_id}", "GET /api/v1/batches/{batch_id}/result",
]


def _toml(value) -> str:
    return json.dumps(value)  # JSON strings, numbers, booleans and arrays are valid TOML values


def _config(budget: Budget, auth_path: Path, user: str, peers: list[str], values: dict[str, list[str]],
            probability: float, phases: list[str], report_dir: Path) -> str:
    """schemathesis.toml for one run: every check, `user` pinned, the generator fed `values` per parameter."""
    lines = [
        f"seed = {budget.seed}",
        *([f"max-time = {budget.max_time}"] if budget.max_time else []),
        "workers = 2",
        "request-timeout = 30",
        "color = false",
        "[generation]",
        "mode = \"all\"",
        f"max-examples = {budget.max_examples}",
        "database = \"none\"",
        "[checks]",
        "enabled = true",  # every check, built-in and ours; an operation below may turn one off
        "[phases]",
        *(f"{name}.enabled = {_toml(name in phases)}" for name in ("examples", "coverage", "fuzzing", "stateful")),
        f"stateful.max-steps = {budget.stateful_steps}",
        "[auth.wfc]",
        f"path = {_toml(str(auth_path))}",
        f"user = {_toml(user)}",
        f"peers = {_toml(peers)}",
        "[cache]",
        f"directory = {_toml(str(report_dir.parent / 'cache'))}",
        "[reports]",
        f"directory = {_toml(str(report_dir))}",
        "junit.enabled = true",
        "[parameters]",
        *(f"{_toml(name)} = {{ dictionary = {_toml(name.replace('.', '_'))}, probability = {probability} }}"
          for name in values),
    ]
    for name, choices in values.items():
        lines += [f"[dictionaries.{name.replace('.', '_')}]", f"values = {_toml(choices)}"]
    for operation in sorted(set(SEMANTIC_422) | set(SOFT_DELETED_READS)):
        lines += ["[[operations]]", f"include-name = {_toml(operation)}"]
        if operation in SEMANTIC_422:
            lines.append(f"checks.positive_data_acceptance.expected-statuses = {_toml(ACCEPTED + [422])}")
        if operation in SOFT_DELETED_READS:
            lines.append("checks.use_after_free.enabled = false")
    return "\n".join(lines) + "\n"


def owner_values(objects: dict[str, str]) -> dict[str, list[str]]:
    """Every parameter through which a request can name one of the owner's objects."""
    name = objects["model_name"]
    return {
        "path.model_id": [objects["model_id"]],
        "query.model_id": [objects["model_id"]],
        "path.model_ref": [objects["model_id"], name, f"{name}@production", f"{name}@v1", f"{name}@latest"],
        "path.name": [name],
        "path.alias": [objects["alias"]],
        "path.job_id": [objects["job_id"]],
        "path.batch_id": [objects["batch_id"]],
        "path.key_id": [objects["key_id"]],
        "body.model": [objects["model_id"], f"{name}@production"],
    }


@dataclass
class RunResult:
    returncode: int
    output: str
    seconds: float


def run_schemathesis(base: str, workdir: Path, budget: Budget, accounts: dict[str, Account], user: str,
                     phases: list[str], probability: float, intruder_of: Account | None = None) -> RunResult:
    """`schemathesis run` against `base` as `user`; `intruder_of` arms the cross-user check with that owner's ids."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    auth_path = workdir / "wfc-auth.json"
    auth_path.write_text(json.dumps(_wfc_auth(accounts)))
    owner = intruder_of or accounts[user]
    config = workdir / "schemathesis.toml"
    config.write_text(_config(budget, auth_path, user, list(accounts), owner_values(owner.objects), probability,
                              phases, workdir / "report"))
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(ROOT)}
    if intruder_of is not None:
        objects = workdir / "owner-objects.json"
        objects.write_text(json.dumps(intruder_of.objects))
        env["INFERQ_FUZZ_OWNER_OBJECTS"] = str(objects)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{base}{API}/openapi.json", "--no-color"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=(budget.max_time or 0) + 900)
    output = result.stdout + result.stderr
    (workdir / "output.txt").write_text(output)
    return RunResult(result.returncode, output, time.monotonic() - started)
