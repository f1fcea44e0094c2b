"""The web's Prometheus metrics and the /metrics endpoint, correct across several gunicorn processes.

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it), every process writes its samples to
files there and /metrics sums them; without it (tests, `flask run`) the in-process registry serves.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import redis
from flask import Blueprint, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.queues import ALL_QUEUES

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# kombu's Redis transport keeps a message of priority p > 0 in the list "<queue>\x06\x16<p>"
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")

HTTP_REQUESTS = Counter("inferq_http_requests_total", "HTTP requests answered, by route template and status",
                        ["method", "route", "status"])
HTTP_DURATION = Histogram("inferq_http_request_duration_seconds", "Time to answer an HTTP request",
                          ["method", "route"], buckets=HTTP_BUCKETS)
JOBS_SUBMITTED = Counter("inferq_jobs_submitted_total", "Prediction jobs accepted and enqueued, by model version",
                         ["model_id"])

bp = Blueprint("metrics", __name__)


class QueueDepthCollector(Collector):
    """Messages waiting in each Celery queue, read from Redis when Prometheus scrapes."""

    def __init__(self, client: redis.Redis, queues: tuple[str, ...] = ALL_QUEUES):
        self.client, self.queues = client, queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("inferq_broker_up", "1 when the broker (Redis) answered the queue-depth read")
        try:
            depths, unacked = self._read()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("inferq_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        for queue, value in depths.items():
            depth.add_metric([queue], value)
        yield depth
        yield GaugeMetricFamily("inferq_queue_unacked", "Messages delivered to workers and not yet acknowledged",
                                value=unacked)

    def _read(self) -> tuple[dict[str, int], int]:
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            for suffix in PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)
        pipe.hlen("unacked")
        counts = pipe.execute()
        step = len(PRIORITY_SUFFIXES)
        depths = {queue: sum(counts[i * step:(i + 1) * step]) for i, queue in enumerate(self.queues)}
        return depths, counts[-1]


def record_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_DURATION.labels(method, route).observe(seconds)


def record_job_submitted(model_id: object) -> None:
    JOBS_SUBMITTED.labels(str(model_id)).inc()


def exposition() -> bytes:
    """Every web process's samples (multiprocess mode) or this process's, plus queue depths."""
    queues = CollectorRegistry(auto_describe=True)
    queues.register(QueueDepthCollector(current_app.extensions["redis"]))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry) + generate_latest(queues)
    return generate_latest(REGISTRY) + generate_latest(queues)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition of the web's metrics."""
    return Response(exposition(), content_type=CONTENT_TYPE_LATEST)
