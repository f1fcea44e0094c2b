"""What the web answers while Redis or PostgreSQL is down or hangs: nothing lost, nothing held for long, and a
JSON error that says to retry where there is no answer without them."""
from __future__ import annotations

import time
from dataclasses import replace


def test_a_submit_while_redis_is_down_is_accepted_at_once_and_stays_queued(settings, client, user, iris_version):
    """The row is committed before any message: with the broker down the client still gets its 202 and the
    job waits in PostgreSQL for the reconciler. It is answered at once, not after kombu's reconnect loop (6 s
    a message) and the whole `wait`, since no message could be sent."""
    from web.app import create_app

    down = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0")).test_client()
    started = time.monotonic()
    response = down.post(f"/api/v1/predict/{iris_version['id']}?wait=10", headers=user["headers"],
                         json={"instances": [[5.0, 3.0, 1.5, 0.2]]})
    assert time.monotonic() - started < 3
    assert response.status_code == 202 and response.json["status"] == "queued", response.json
    stored = client.get(response.headers["Location"], headers=user["headers"])
    assert stored.status_code == 200 and stored.json["id"] == response.json["id"]


def test_a_submit_while_redis_hangs_is_accepted_within_seconds(settings, user, iris_version):
    """A Redis that accepts connections but never answers (stalled, or a half-open link) held the request
    thread for good; the broker's socket timeouts bound it to a few seconds."""
    import socket

    from web.app import create_app

    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # listens, never accepts or answers
        hung = create_app(replace(settings, redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0"))
        started = time.monotonic()
        response = hung.test_client().post(f"/api/v1/predict/{iris_version['id']}?wait=10",
                                           headers=user["headers"], json={"instances": [[5.0, 3.0, 1.5, 0.2]]})
        assert time.monotonic() - started < 15
    assert response.status_code == 202 and response.json["status"] == "queued", response.json


def test_requests_while_postgres_is_down_answer_503_with_retry_after(settings, client, user, iris_version):
    from web.app import create_app

    key = client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "outage"}).json["key"]
    down = create_app(replace(settings, database_url="postgresql+psycopg://inferq@127.0.0.1:1/inferq")).test_client()
    as_key = {"X-API-Key": key}
    responses = {
        "login": down.post("/api/v1/auth/login", json={"email": user["email"], "password": "any-password-1"}),
        "submit": down.post(f"/api/v1/predict/{iris_version['id']}", headers=as_key,
                            json={"instances": [[5.0, 3.0, 1.5, 0.2]]}),
        "jobs": down.get("/api/v1/jobs", headers=as_key),
    }
    for what, response in responses.items():
        assert response.status_code == 503, (what, response.json)
        assert response.json["error"]["code"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) >= 1  # on login, the rate limiter's own Retry-After
    bearer = down.get("/api/v1/jobs", headers=user["headers"])  # its revocation cannot be checked
    assert bearer.status_code == 503 and bearer.json["error"]["code"] == "auth_unavailable"


def test_submits_publish_again_once_a_restarted_redis_is_back(settings, user, iris_version, tmp_path):
    """A request thread keeps its broker connection from one message to the next (web/publishing.py). The
    submit that finds Redis gone is still accepted, its job left to the reconciler, and once Redis is back the
    next submit's message reaches the queue again."""
    import redis

    from bench.stack import OwnRedis
    from common.queues import PREDICTIONS_QUEUE
    from web.app import create_app

    broker = OwnRedis(tmp_path / "redis").start()
    try:
        web = create_app(replace(settings, redis_url=broker.url)).test_client()
        queue = redis.Redis.from_url(broker.url)

        def submit():
            return web.post(f"/api/v1/predict/{iris_version['id']}", headers=user["headers"],
                            json={"instances": [[5.0, 3.0, 1.5, 0.2]]})

        assert submit().status_code == 202 and queue.llen(PREDICTIONS_QUEUE) == 1
        broker.stop()
        lost = submit()
        assert lost.status_code == 202 and lost.json["status"] == "queued"
        broker.start()  # its append-only file kept the first message
        assert submit().status_code == 202
        assert queue.llen(PREDICTIONS_QUEUE) == 2
    finally:
        broker.stop()
