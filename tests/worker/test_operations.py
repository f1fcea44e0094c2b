"""What an operator runs and reads: readiness with live workers, and Flower as the Procfile starts it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import ROOT, free_port, upload
from tests.test_layout import procfile
from tests.web.test_stats import percentiles
from tests.worker.test_jobs import submit

FLOWER_AUTH = ("ops", "flower-test-pw-7")


def test_readiness_is_200_with_database_redis_and_workers_up(client, workers):
    response = client.get("/health/ready")
    assert response.status_code == 200, response.json
    checks = response.json["checks"]
    assert response.json["status"] == "ready" and all(check["ok"] for check in checks.values())
    assert checks["workers"]["count"] >= len(workers)
    assert {w.name for w in workers} <= {name.split("@")[0] for name in checks["workers"]["names"]}


def test_stats_of_real_jobs_agree_with_their_timings(client, user, workers, iris_model):
    version = upload(client, user["headers"], iris_model[0], name="measured")
    jobs = [submit(client, user["headers"], version["id"], [[5.0, 3.0, 1.5, 0.2]], wait=20).json for _ in range(5)]
    jobs.append(submit(client, user["headers"], version["id"], [[None, 1.0, 1.0, 1.0]], wait=20).json)
    assert [j["status"] for j in jobs] == ["succeeded"] * 5 + ["failed"]
    stats = client.get(f"/api/v1/models/{version['id']}/stats?window=15m", headers=user["headers"]).json
    assert (stats["jobs"]["succeeded"], stats["jobs"]["failed"], stats["error_rate"]) == (5, 1, pytest.approx(1 / 6))
    assert stats["cache_hit_rate"] == pytest.approx(sum(j["cache_hit"] for j in jobs) / 6)
    for phase, finished in (("total_ms", jobs), ("queue_ms", jobs), ("inference_ms", jobs[:5])):
        assert stats["latency"][phase] == pytest.approx(percentiles([j["timings"][phase] for j in finished])), phase
    assert sum(p["jobs"] for p in stats["series"]) == 6


def _flower_env(test_env: dict, port: int, auth: str | None) -> dict[str, str]:
    env = {**os.environ, **test_env, "FLOWER_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FLOWER_BASIC_AUTH", None)
    env.pop("FLOWER_HOST", None)
    return {**env, "FLOWER_BASIC_AUTH": auth} if auth else env


@pytest.fixture(scope="module")
def flower(test_env, workers, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    """The Procfile's own `flower` command line, with only the port and the credentials set."""
    port, log = free_port(), tmp_path_factory.mktemp("flower") / "flower.log"
    proc = subprocess.Popen(["bash", "-c", "exec " + procfile()["flower"]], cwd=ROOT,
                            env=_flower_env(test_env, port, ":".join(FLOWER_AUTH)),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            requests.get(url + "/healthcheck", timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(0.3)
    yield url, proc
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(20)


def test_flower_lists_the_test_workers_behind_basic_auth(flower, workers):
    url, _ = flower
    assert requests.get(url + "/api/workers", timeout=10).status_code == 401
    assert requests.get(url + "/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
    expected, seen = {w.name for w in workers}, set()
    deadline = time.monotonic() + 30
    while not expected <= seen and time.monotonic() < deadline:
        response = requests.get(url + "/api/workers?refresh=1", auth=FLOWER_AUTH, timeout=20)
        assert response.status_code == 200
        seen = {name.split("@")[0] for name in response.json()}
    assert expected <= seen, f"Flower saw {seen}"


def test_flower_serves_prometheus_metrics_and_binds_localhost(flower):
    url, proc = flower
    # Flower leaves /metrics open for Prometheus (its API and UI need the password): hence localhost only
    metrics = requests.get(url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "flower_events_total" in metrics.text
    listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("inet") if c.status == "LISTEN"}
    assert listening == {"127.0.0.1"}


def test_flower_refuses_to_start_without_credentials(test_env):
    result = subprocess.run(["bash", "-c", "exec " + procfile()["flower"]], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env=_flower_env(test_env, free_port(), None))
    assert result.returncode != 0 and "FLOWER_BASIC_AUTH" in result.stderr
