"""Shared fixtures: a fresh test database and Redis db, the app, real Celery worker processes, users, models."""
from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from common.config import Settings, sqlalchemy_url

ROOT = Path(__file__).resolve().parent.parent
# Parallel test sessions on one machine (e.g. two engineers) pick different slots: own database, own Redis db.
TEST_SLOT = int(os.environ.get("INFERQ_TEST_SLOT", "0"))
TEST_REDIS_DB = 15 - TEST_SLOT
PASSWORD = "correct-horse-42"


def _test_urls() -> tuple[str, str, str]:
    """(test database URL, admin URL on the same server, test Redis URL) from DATABASE_URL/REDIS_URL."""
    base = make_url(sqlalchemy_url(os.environ["DATABASE_URL"]))
    test_db = base.set(database=f"{base.database or 'inferq'}_test{TEST_SLOT or ''}")
    admin = base.set(database="postgres")
    redis_url = redis.connection.parse_url(os.environ["REDIS_URL"])
    host = redis_url.get("path") or f"{redis_url.get('host', '127.0.0.1')}:{redis_url.get('port', 6379)}"
    return (test_db.render_as_string(hide_password=False), admin.render_as_string(hide_password=False),
            f"redis://{host}/{TEST_REDIS_DB}")


@pytest.fixture(scope="session")
def test_env(tmp_path_factory) -> dict[str, str]:
    """The environment shared by the in-process app and the worker subprocesses."""
    database_url, _, redis_url = _test_urls()
    return {
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "INFERQ_ENV": "test",
        "STORAGE_ROOT": str(tmp_path_factory.mktemp("storage")),
        "INFERQ_FAULT_INJECTION": "1", "JOB_STUCK_SECONDS": "4", "JOB_SOFT_TIME_LIMIT": "20",
        "JOB_HARD_TIME_LIMIT": "25", "JOB_MAX_ATTEMPTS": "3", "LOGIN_RATE_LIMIT": "1000 per minute",
        "MODEL_CACHE_SIZE": "5", "BATCH_ROWS_PER_CHUNK": "20000", "LOG_LEVEL": "INFO",
        "SANDBOX_MEMORY_MB": "1024", "SANDBOX_CPU_SECONDS": "20", "SANDBOX_WALL_SECONDS": "30",
        "WORKER_METRICS_DIR": str(tmp_path_factory.mktemp("worker-metrics")), "WORKER_METRICS_PORT": "0",
    }


@pytest.fixture(scope="session")
def settings(test_env) -> Settings:
    return Settings.from_env(test_env)


@pytest.fixture(scope="session")
def database(settings, test_env) -> str:
    """A fresh database built by the migrations (not create_all), so the migrations are what is tested."""
    _, admin_url, _ = _test_urls()
    name = make_url(settings.database_url).database
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, **test_env, "FLASK_APP": "web.app:create_app"})
    return settings.database_url


@pytest.fixture(scope="session")
def redis_conn(settings) -> redis.Redis:
    conn = redis.Redis.from_url(settings.redis_url)
    conn.flushdb()
    return conn


@pytest.fixture(scope="session")
def app(settings, database, redis_conn):
    from web.app import create_app

    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


def stop_process_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM a process started with start_new_session and its children; SIGKILL after 20 s."""
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class WorkerProcess:
    """A real `celery worker` subprocess (prefork pool) the tests can stop, kill and restart."""

    def __init__(self, env: dict[str, str], name: str, concurrency: int = 2, log_dir: Path | None = None):
        self.env, self.name, self.concurrency = env, name, concurrency
        self.log_path = (log_dir or Path("/tmp")) / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO",
             f"--concurrency={self.concurrency}", "--pool=prefork", f"--hostname={self.name}@%h",
             "--queues=predictions,batches,maintenance", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def child_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def stop(self) -> None:
        stop_process_group(self.proc)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_workers(celery_app, count: int = 1, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = celery_app.control.ping(timeout=1.0) or []
        if len(replies) >= count:
            return replies
    raise AssertionError(f"{count} worker(s) did not answer a ping within {timeout}s")


@pytest.fixture(scope="session")
def workers(app, test_env, tmp_path_factory) -> Iterator[list[WorkerProcess]]:
    """Two real worker processes, two children each, shared by the session."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    started = [WorkerProcess({**test_env, "WORKER_METRICS_PORT": str(free_port())}, f"w{i}-{uuid.uuid4().hex[:6]}",
                             log_dir=log_dir).start() for i in range(2)]
    wait_for_workers(app.extensions["celery"], 2)
    yield started
    for worker in started:
        worker.stop()


def register(client, email: str | None = None) -> dict:
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    assert client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD}).status_code == 201
    tokens = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD}).json
    return {"email": email, "tokens": tokens, "headers": {"Authorization": f"Bearer {tokens['access_token']}"}}


@pytest.fixture
def user(client) -> dict:
    return register(client)


@pytest.fixture
def other_user(client) -> dict:
    return register(client)


def model_file(estimator, fmt: str = "skops") -> tuple[io.BytesIO, str]:
    """The bytes of `estimator` saved in one of the accepted formats, and a filename."""
    buffer = io.BytesIO()
    if fmt == "skops":
        import skops.io as sio

        buffer.write(sio.dumps(estimator))
    elif fmt == "joblib":
        import joblib

        joblib.dump(estimator, buffer)
    else:
        pickle.dump(estimator, buffer)
    buffer.seek(0)
    return buffer, f"model.{'pkl' if fmt == 'pickle' else fmt}"


def upload(client, headers: dict, estimator, name: str = "model", fmt: str = "skops", **form) -> dict:
    data, filename = model_file(estimator, fmt)
    response = client.post("/api/v1/models/upload", headers=headers, content_type="multipart/form-data",
                           data={"file": (data, filename), "name": name, **form})
    assert response.status_code == 201, response.json
    return response.json


@pytest.fixture(scope="session")
def iris_model():
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=500).fit(X, y), X


@pytest.fixture
def iris_version(client, user, iris_model) -> dict:
    """The iris model, uploaded by `user`."""
    return upload(client, user["headers"], iris_model[0], name="iris")


@pytest.fixture
def solo_worker(settings, database, redis_conn, test_env, tmp_path):
    """A client and ONE single-process worker on a Redis db of their own, so a test knows which
    process runs each job; `solo_worker(**env)` starts it with extra environment."""
    from dataclasses import replace

    from web.app import create_app

    started = []

    def start(**env: str):
        db_number = int(settings.redis_url.rsplit("/", 1)[1]) - 8
        isolated = f"{settings.redis_url.rsplit('/', 1)[0]}/{db_number}"
        app = create_app(replace(settings, redis_url=isolated))
        app.extensions["redis"].flushdb()
        worker = WorkerProcess({**test_env, "REDIS_URL": isolated, **env}, f"solo-{uuid.uuid4().hex[:6]}",
                               concurrency=1, log_dir=tmp_path).start()
        started.append(worker)
        wait_for_workers(app.extensions["celery"], 1)
        return app.test_client(), worker

    yield start
    for worker in started:
        worker.stop()
