"""Liveness answers without dependencies; readiness names the part that is down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port

# A second app in its own process: extensions such as the rate limiter are process-wide singletons,
# so building it here would point the session's app at the dead Redis too.
PROBE = """
import json
from web.app import create_app
client = create_app().test_client()
answers = {path: client.get(path) for path in ("/health", "/health/ready")}
print(json.dumps({path: [r.status_code, r.json] for path, r in answers.items()}))
"""


@pytest.fixture(scope="module")
def redis_down(database, test_env) -> dict:
    """{path: [status, body]} of both probes, from an app whose Redis is down, timed."""
    started = time.monotonic()
    env = {**os.environ, **test_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": time.monotonic() - started}


def test_liveness_touches_no_dependency(client, redis_down):
    assert client.get("/health").json == {"status": "ok"}
    status, body = redis_down["/health"]
    assert status == 200 and body == {"status": "ok"}


def test_readiness_is_503_naming_redis_when_it_is_unreachable(redis_down):
    assert redis_down["seconds"] < 30, "a probe must answer quickly, even when Redis is down"
    status, body = redis_down["/health/ready"]
    assert status == 503 and body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is False and "Connection" in body["checks"]["redis"]["error"]
    assert body["checks"]["workers"]["ok"] is False
