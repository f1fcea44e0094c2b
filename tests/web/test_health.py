"""Liveness answers without dependencies; readiness names the part that is down."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="module")
def app_without_redis(settings, database):
    """A second app whose REDIS_URL points at a port nothing listens on."""
    from web.app import create_app

    return create_app(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))


def test_liveness_touches_no_dependency(client, app_without_redis):
    for app_client in (client, app_without_redis.test_client()):
        response = app_client.get("/health")
        assert response.status_code == 200 and response.json == {"status": "ok"}


def test_readiness_is_503_naming_redis_when_it_is_unreachable(app_without_redis):
    started = time.monotonic()
    response = app_without_redis.test_client().get("/health/ready")
    assert time.monotonic() - started < 15, "a probe must answer quickly, even when Redis is down"
    assert response.status_code == 503
    body = response.json
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is False and "Connection" in body["checks"]["redis"]["error"]
    assert body["checks"]["workers"]["ok"] is False
