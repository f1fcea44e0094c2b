"""Each worker serves its pool processes' metrics: jobs, timings, the model cache, model loads, task durations."""
from __future__ import annotations

import time

import requests

from tests.conftest import upload
from tests.worker.test_batches import trained  # noqa: F401  (fixture)
from tests.web.test_metrics import samples
from tests.worker.test_jobs import submit

ROW = [[5.0, 3.0, 1.5, 0.2]]


def scrape_workers(workers) -> dict[tuple[str, frozenset], float]:
    """Every sample summed over the test workers' exporters, as Prometheus would add them up."""
    total: dict[tuple[str, frozenset], float] = {}
    for worker in workers:
        text = requests.get(f"http://127.0.0.1:{worker.env['WORKER_METRICS_PORT']}/metrics", timeout=5).text
        for key, value in samples(text).items():
            total[key] = total.get(key, 0.0) + value
    return total


def metric(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def scrape_until(workers, done, timeout: float = 15.0) -> dict:
    """The task's postrun hook records just after the result is visible: poll briefly."""
    deadline = time.monotonic() + timeout
    while not done(scraped := scrape_workers(workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return scraped


def test_workers_export_jobs_cache_loads_and_task_durations(client, user, workers, iris_model):
    version = upload(client, user["headers"], iris_model[0], name="exported")
    before = scrape_workers(workers)
    jobs = [submit(client, user["headers"], version["id"], ROW, wait=20).json for _ in range(6)]
    failed = submit(client, user["headers"], version["id"], [[None, 1.0, 1.0, 1.0]], wait=20).json
    assert [j["status"] for j in jobs] == ["succeeded"] * 6 and failed["status"] == "failed"
    task = {"task": "inferq.predictions.run", "state": "SUCCESS"}

    def delta(scraped, name, **labels):
        return metric(scraped, name, **labels) - metric(before, name, **labels)

    after = scrape_until(workers, lambda s: delta(s, "inferq_task_duration_seconds_count", **task) >= 7)
    assert metric(after, "inferq_jobs_succeeded_total", model_id=version["id"]) == 6
    assert metric(after, "inferq_jobs_failed_total", model_id=version["id"], code="prediction_error") == 1
    # unlabelled series are shared with any other test's jobs still finishing: at least ours
    for phase in ("queue", "total"):
        assert delta(after, f"inferq_job_{phase}_seconds_count") >= 7
    assert delta(after, "inferq_job_inference_seconds_count") >= 6
    loads = sum(not j["cache_hit"] for j in jobs + [failed])
    assert delta(after, "inferq_model_cache_misses_total") >= loads >= 1
    assert delta(after, "inferq_model_cache_hits_total") >= 7 - loads
    assert delta(after, "inferq_model_load_seconds_count") >= loads
    assert metric(after, "inferq_model_cache_bytes") > 0 and metric(after, "inferq_model_cache_models") >= 1
    assert delta(after, "inferq_task_duration_seconds_count", **task) >= 7


def test_batch_rows_helper_counts_scored_and_failed_rows():
    from prometheus_client import REGISTRY

    from worker.metrics import record_batch_rows

    record_batch_rows("model-a", 1000, failed=3)
    record_batch_rows("model-a", 500)
    assert REGISTRY.get_sample_value("inferq_batch_rows_scored_total", {"model_id": "model-a"}) == 1500
    assert REGISTRY.get_sample_value("inferq_batch_rows_failed_total", {"model_id": "model-a"}) == 3


def test_an_unwritable_metrics_dir_falls_back_to_a_temp_dir():
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("from pathlib import Path; import os; from worker.metrics import use_multiprocess_dir; "
            "p = use_multiprocess_dir(Path('/proc/inferq-no-such-dir/w1@host')); "
            "print(p, p.is_dir(), os.environ['PROMETHEUS_MULTIPROC_DIR'] == str(p))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path, is_dir, exported = out.split()
    assert path.endswith("inferq-metrics/w1@host") and is_dir == exported == "True"


def test_batches_count_rows_and_log_with_the_submit_request_id(client, user, workers, trained):
    from tests.worker.test_batches import frame_of, submit as submit_batch, wait_batch
    from tests.worker.test_logs import worker_records

    version = upload(client, user["headers"], trained, name="batch-counted")
    frame = frame_of(2500).astype({"f1": object})
    frame.loc[[3, 7], "f1"] = "oops"  # two rows the model cannot score
    headers = {**user["headers"], "X-Request-ID": "batch-submit-1"}
    batch = submit_batch(client, headers, version["id"], frame.to_csv(index=False).encode(), "rows.csv").json
    done = wait_batch(client, user["headers"], batch["id"])
    assert (done["status"], done["rows_done"], done["rows_failed"]) == ("succeeded", 2500, 2)
    scraped = scrape_until(workers, lambda s: metric(s, "inferq_batch_rows_scored_total", model_id=version["id"]) > 0)
    assert metric(scraped, "inferq_batch_rows_scored_total", model_id=version["id"]) == 2498
    assert metric(scraped, "inferq_batch_rows_failed_total", model_id=version["id"]) == 2
    lines = [r for r in worker_records(workers) if r.get("batch_id") == batch["id"]]
    assert {r["logger"] for r in lines} >= {"celery.app.trace"}  # plan, chunk and finish tasks
    assert all(r["request_id"] == "batch-submit-1" and r["model_id"] == version["id"] for r in lines)
