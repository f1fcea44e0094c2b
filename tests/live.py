"""A live web server for tests that need real HTTP: gunicorn with several processes, as the Procfile runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port, stop_process_group


def wait_until_serving(proc: subprocess.Popen, url: str, log_path: Path, seconds: float = 60) -> None:
    """Until the gunicorn in `proc` answers /health; fails with the end of its log if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gunicorn exited: {log_path.read_text()[-3000:]}"
        try:
            if requests.get(url + "/health", timeout=10).ok:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError(f"gunicorn did not answer /health within {seconds:.0f}s")


class LiveServer:
    """`gunicorn "web.app:create_app()"` reading ./gunicorn.conf.py, its JSON logs in `log_path`."""

    def __init__(self, env: dict[str, str], workdir: Path, processes: int = 2):
        self.port, self.processes = free_port(), processes
        self.metrics_dir = workdir / "metrics"
        self.log_path = workdir / "web.log"
        self.env = {**os.environ, **env, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.processes),
             "--threads", "4", "web.app:create_app()"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_serving(self.proc, self.url, self.log_path)
        return self

    def log_records(self) -> list[dict]:
        """Every line gunicorn and the app wrote, parsed: each must be one JSON object."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        stop_process_group(self.proc)


@pytest.fixture(scope="module")
def live_server(app, test_env, tmp_path_factory) -> Iterator[LiveServer]:
    """A two-process gunicorn on a free port, against the test database and Redis (`app` migrates them)."""
    server = LiveServer(test_env, tmp_path_factory.mktemp("live-web")).start()
    yield server
    server.stop()
