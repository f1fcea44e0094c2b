"""The web's /metrics: HTTP requests by route template, jobs submitted, queue depth, sums across gunicorn processes."""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import upload
from tests.live import live_server  # noqa: F401  (fixture)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_requests_are_counted_by_route_template_and_status(client, user):
    route = "/api/v1/jobs/<uuid:job_id>"
    before = client.get("/metrics").text
    for _ in range(3):
        assert client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=user["headers"]).status_code == 404
    after = client.get("/metrics")
    assert after.status_code == 200 and after.content_type.startswith("text/plain")
    counted = {"method": "GET", "route": route, "status": "404"}
    assert value(after.text, "inferq_http_requests_total", **counted) - \
        value(before, "inferq_http_requests_total", **counted) == 3
    timed = {"method": "GET", "route": route}
    assert value(after.text, "inferq_http_request_duration_seconds_count", **timed) - \
        value(before, "inferq_http_request_duration_seconds_count", **timed) == 3
    # label values are templates, never raw paths: a million ids stay one series
    assert "/api/v1/jobs/" + "0" * 8 not in after.text and "unmatched" not in route


def test_jobs_submitted_are_counted_by_model(client, user, iris_model):
    version = upload(client, user["headers"], iris_model[0], name="counted")
    for _ in range(4):
        response = client.post(f"/api/v1/predict/{version['id']}", headers=user["headers"],
                               json={"instances": [[5.0, 3.0, 1.5, 0.2]]})
        assert response.status_code == 202
    assert value(client.get("/metrics").text, "inferq_jobs_submitted_total", model_id=version["id"]) == 4


def test_queue_depth_is_read_from_redis_when_scraped(redis_conn):
    from web.metrics import QueueDepthCollector

    # queues of their own, so the session's workers do not consume what the test counts
    empty, busy = f"depth-{uuid.uuid4().hex}", f"depth-{uuid.uuid4().hex}"
    redis_conn.rpush(busy, "a", "b", "c")
    redis_conn.rpush(busy + "\x06\x163", "d")  # kombu's list for priority 3
    try:
        families = {f.name: f for f in QueueDepthCollector(redis_conn, (empty, busy)).collect()}
    finally:
        redis_conn.delete(busy, busy + "\x06\x163")
    assert {s.labels["queue"]: s.value for s in families["inferq_queue_depth"].samples} == {empty: 0, busy: 4}
    assert families["inferq_queue_unacked"].samples[0].value >= 0
    assert families["inferq_broker_up"].samples[0].value == 1
    down = {f.name: f for f in QueueDepthCollector(redis.Redis(port=1, socket_connect_timeout=0.5)).collect()}
    assert down["inferq_broker_up"].samples[0].value == 0 and "inferq_queue_depth" not in down


def test_metrics_expose_queue_depth(client):
    text = client.get("/metrics").text
    assert {"predictions", "batches", "maintenance"} <= {
        dict(labels)["queue"] for name, labels in samples(text) if name == "inferq_queue_depth"}
    assert value(text, "inferq_broker_up") == 1


def test_counts_add_up_across_gunicorn_processes(live_server):  # noqa: F811
    health = {"method": "GET", "route": "/health", "status": "200"}
    before = value(requests.get(live_server.url + "/metrics", timeout=10).text, "inferq_http_requests_total", **health)

    def ping(_):
        # a new connection each time, many at once, so both processes get some
        return requests.get(live_server.url + "/health", headers={"Connection": "close"}, timeout=10).status_code

    sent, writers = 0, set()
    with ThreadPoolExecutor(8) as pool:
        while len(writers) < 2 and sent < 2000:
            assert set(pool.map(ping, range(50))) == {200}
            sent += 50
            writers = {p.name.rsplit("_", 1)[1] for p in live_server.metrics_dir.glob("counter_*.db")}
    assert len(writers) >= 2, "one process answered everything; the test would prove nothing"
    for _ in range(4):  # whichever process answers the scrape, it reports every process's counts
        text = requests.get(live_server.url + "/metrics", timeout=10).text
        assert value(text, "inferq_http_requests_total", **health) - before == sent
        assert value(text, "inferq_queue_depth", queue="predictions") >= 0
