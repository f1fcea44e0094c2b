"""The workers' Prometheus metrics: jobs, model cache, model loads, task durations, batch rows.

Pool children record into prometheus_client's multiprocess files (one directory per worker node,
emptied when the worker starts); the worker's main process serves their sum over HTTP on
WORKER_METRICS_PORT. Metrics are created on first use, after the directory is chosen.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from common.config import Settings

log = logging.getLogger(__name__)
JOB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


@dataclass(frozen=True)
class WorkerMetrics:
    jobs_succeeded: Any
    jobs_failed: Any
    job_queue: Any
    job_load: Any
    job_inference: Any
    job_total: Any
    cache_hits: Any
    cache_misses: Any
    cache_evictions: Any
    cache_bytes: Any
    cache_models: Any
    model_load: Any
    task_duration: Any
    batch_rows_scored: Any
    batch_rows_failed: Any


@cache
def worker_metrics() -> WorkerMetrics:
    """The metric objects, built in the process that first records (a pool child, after the fork)."""
    from prometheus_client import Counter, Gauge, Histogram

    def seconds(name: str, what: str, labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, what, labels, buckets=JOB_BUCKETS)

    return WorkerMetrics(
        jobs_succeeded=Counter("inferq_jobs_succeeded_total", "Prediction jobs that succeeded", ["model_id"]),
        jobs_failed=Counter("inferq_jobs_failed_total", "Prediction jobs that failed, by error code",
                            ["model_id", "code"]),
        job_queue=seconds("inferq_job_queue_seconds", "Time from submit to a worker starting the job"),
        job_load=seconds("inferq_job_load_seconds", "Model load time of jobs that missed the cache (0 on a hit)"),
        job_inference=seconds("inferq_job_inference_seconds", "Time spent in the model's predict"),
        job_total=seconds("inferq_job_total_seconds", "Time from submit to the job's result being written"),
        cache_hits=Counter("inferq_model_cache_hits_total", "Model cache lookups answered from memory"),
        cache_misses=Counter("inferq_model_cache_misses_total", "Model cache lookups that loaded the model"),
        cache_evictions=Counter("inferq_model_cache_evictions_total", "Models evicted from a model cache"),
        cache_bytes=Gauge("inferq_model_cache_bytes", "Estimated bytes of the models held by live pool processes",
                          multiprocess_mode="livesum"),
        cache_models=Gauge("inferq_model_cache_models", "Models held by live pool processes",
                           multiprocess_mode="livesum"),
        model_load=seconds("inferq_model_load_seconds", "Time to load a model artifact into memory"),
        task_duration=seconds("inferq_task_duration_seconds", "Celery task run time, by task and final state",
                              ("task", "state")),
        batch_rows_scored=Counter("inferq_batch_rows_scored_total", "Batch rows scored, by model version",
                                  ["model_id"]),
        batch_rows_failed=Counter("inferq_batch_rows_failed_total", "Batch rows that could not be scored",
                                  ["model_id"]),
    )


def record_job(model_id: object, status: str, error_code: str | None, queue_s: float | None,
               load_s: float | None, inference_s: float | None, total_s: float | None) -> None:
    """Count a finished prediction job and observe its timings (None: that phase did not happen)."""
    m = worker_metrics()
    if status == "succeeded":
        m.jobs_succeeded.labels(str(model_id)).inc()
    else:
        m.jobs_failed.labels(str(model_id), error_code or "unknown").inc()
    for histogram, value in ((m.job_queue, queue_s), (m.job_load, load_s),
                             (m.job_inference, inference_s), (m.job_total, total_s)):
        if value is not None:
            histogram.observe(max(value, 0.0))


def record_model_load(seconds: float) -> None:
    worker_metrics().model_load.observe(seconds)


def record_batch_rows(model_id: object, rows: int, failed: int = 0) -> None:
    """Count rows a batch chunk scored (`rows`) and rows it could not score (`failed`)."""
    m = worker_metrics()
    if rows:
        m.batch_rows_scored.labels(str(model_id)).inc(rows)
    if failed:
        m.batch_rows_failed.labels(str(model_id)).inc(failed)


def record_task(task: str, state: str, seconds: float) -> None:
    worker_metrics().task_duration.labels(task, state).observe(seconds)


_cache_seen: dict[str, int] = {}


def sync_model_cache(model_cache: Any) -> None:
    """Carry the cache's own running counts into the counters, and its size into the gauges."""
    m = worker_metrics()
    if _cache_seen.get("id") != id(model_cache):  # a new cache (fresh process): its counts start at 0
        _cache_seen.clear()
        _cache_seen["id"] = id(model_cache)
    for name, counter in (("hits", m.cache_hits), ("misses", m.cache_misses), ("evictions", m.cache_evictions)):
        now = getattr(model_cache, name)
        if now > _cache_seen.get(name, 0):
            counter.inc(now - _cache_seen.get(name, 0))
        _cache_seen[name] = now
    m.cache_bytes.set(model_cache.bytes_held)
    m.cache_models.set(len(model_cache))


def node_metrics_dir(settings: Settings, nodename: str) -> Path:
    return Path(settings.worker_metrics_dir).resolve() / re.sub(r"[^A-Za-z0-9_.@-]", "_", nodename)


def use_multiprocess_dir(path: Path) -> Path:
    """Empty `path` (a temp dir if it cannot be written) and make this process and its pool children record there."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only checkout in an image: metrics still work, from a temp dir
        fallback = Path(tempfile.gettempdir()) / "inferq-metrics" / path.name
        log.warning("worker metrics directory not writable; using a temp dir",
                    extra={"wanted": str(path), "using": str(fallback), "reason": str(exc)})
        path = fallback
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    import prometheus_client.values as values

    # prometheus_client picks file-backed values at import; the worker only now knows it wants them
    values.ValueClass = values.get_value_class()
    return path


def forget_process(pid: int) -> None:
    """Drop a finished pool process's live gauges (its counters stay: they still count)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def _forget_dead_processes(path: Path) -> None:
    # a child killed by SIGKILL never runs its shutdown hook; its cache is gone all the same
    for entry in path.glob("gauge_live*.db"):
        match = _LIVE_FILE.match(entry.name)
        if match and not _alive(int(match.group(1))):
            forget_process(int(match.group(1)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def start_exporter(settings: Settings, path: Path) -> Any | None:
    """Serve the sum of this worker's pool processes' metrics on WORKER_METRICS_HOST:WORKER_METRICS_PORT."""
    if not settings.worker_metrics_port:
        return None
    from prometheus_client import CollectorRegistry, start_http_server, multiprocess

    class LiveProcesses(multiprocess.MultiProcessCollector):
        def collect(self):
            _forget_dead_processes(path)
            return super().collect()

    registry = CollectorRegistry()
    LiveProcesses(registry, str(path))
    try:
        server, _thread = start_http_server(settings.worker_metrics_port, settings.worker_metrics_host, registry)
    except OSError as exc:
        log.warning("worker metrics exporter not started", extra={"port": settings.worker_metrics_port,
                                                                  "reason": str(exc)})
        return None
    log.info("worker metrics exporter listening", extra={"host": settings.worker_metrics_host,
                                                         "port": settings.worker_metrics_port})
    return server
