"""`make bench` / `make bench-quick`: InferQ against same-run baselines, as issue 7 lists them.

One run brings up the stack (bench/stack.py: gunicorn + two celery workers, own database `inferq_bench`
and Redis db 10) beside the no-op workers of the bare Celery floor, measures the baselines and the five
measurements (the floor and the job figures in alternating rounds), prints a table and writes
bench/results.json with every figure and, under `targets`, each target's measured `ratio` and `pass`.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests

from bench.stack import ROOT, Client, JsonConnection, Stack, Worker, own_services, reset_dir

# test slots 0-3 use Redis dbs 15-12 (tests/conftest.py): the bench stays clear of them
BENCH_DB, BENCH_REDIS_DB = "inferq_bench", 10
DATA = ROOT / "bench" / "data"
CLIENTS = 8


@dataclass(frozen=True)
class Profile:
    name: str
    predict_samples: int      # raw predict_proba calls on each input
    rtt_samples: int          # sequential no-op round trips
    latency_samples: int      # sequential single-row jobs with ?wait
    round_seconds: float      # one round of the 8-client runs (no-op, then jobs)
    rounds: int               # rounds, alternating the floor and InferQ
    batch_rows: int
    memory_trees: int         # ExtraTrees estimators per cached model (about 2 MB each)
    upload_bytes: int         # the large upload watched for web memory


# six short rounds rather than three long ones: this machine's speed drifts within a minute, and finer
# alternation lets the floor and InferQ see the same machine (the totals are unchanged: 30 s of each)
FULL = Profile("full", 2000, 600, 480, 5.0, 6, 1_000_000, 20, 1 << 30)
QUICK = Profile("quick", 500, 150, 120, 4.0, 1, 100_000, 5, 256 << 20)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- data and models

def batch_data(rows: int) -> tuple[Path, Path]:
    """The batch CSV (f0..f29) and the LogisticRegression fitted on a sample of it (joblib)."""
    from bench.make_data import make_classification_csv

    stem = "1m" if rows == 1_000_000 else f"{rows // 1000}k"
    csv_path, model_path = DATA / f"{stem}.csv", DATA / ("model.joblib" if stem == "1m" else f"model-{stem}.joblib")
    if not (csv_path.exists() and model_path.exists()):
        import joblib

        DATA.mkdir(parents=True, exist_ok=True)
        log(f"generating {csv_path} ({rows} rows x 30 columns)")
        model, _ = make_classification_csv(csv_path, rows)
        joblib.dump(model, model_path)
    return csv_path, model_path


def large_upload_file(source: Path, size: int) -> Path:
    """A CSV of about `size` bytes: `source` repeated (header once)."""
    target = DATA / f"upload-{size >> 20}mb.csv"
    if target.exists() and target.stat().st_size >= size:
        return target
    with open(source, "rb") as f:
        header = f.readline()
        body = f.read()
    with open(target, "wb") as out:
        out.write(header)
        written = len(header)
        while written < size:
            piece = body[: size - written] if size - written < len(body) else body
            piece = piece[: piece.rfind(b"\n") + 1] if piece is not body else piece
            out.write(piece)
            written += len(piece)
            if not piece:
                break
    return target


def small_csv(workdir: Path) -> Path:
    path = workdir / "small.csv"
    rows = np.round(np.random.default_rng(9).standard_normal((100, 30)), 3)
    path.write_text(",".join(f"f{i}" for i in range(30)) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def skops_bytes(model) -> bytes:
    import skops.io as sio

    return sio.dumps(model)


def memory_models(trees: int) -> list:
    """Five distinct ExtraTrees classifiers, each a few times `trees` MB (fitted once, then kept in DATA)."""
    import joblib
    from sklearn.ensemble import ExtraTreesClassifier

    path = DATA / f"memory-models-{trees}.joblib"
    if path.exists():
        return joblib.load(path)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((20_000, 30)), rng.integers(0, 3, 20_000)
    models = [ExtraTreesClassifier(n_estimators=trees, random_state=seed).fit(x, y) for seed in range(5)]
    DATA.mkdir(parents=True, exist_ok=True)
    joblib.dump(models, path)
    return models


# ---------------------------------------------------------------- baselines

def _noop_client(go, seconds: float, queue) -> None:
    from bench.noop_app import noop

    noop.delay().get(timeout=30)
    queue.put("ready")
    go.wait()
    deadline, latencies = time.perf_counter() + seconds, []
    while (started := time.perf_counter()) < deadline:
        noop.delay().get(timeout=30)
        if (finished := time.perf_counter()) <= deadline:  # counted as the job clients count theirs
            latencies.append(finished - started)
    queue.put(latencies)


def start_noop_workers(stack: Stack, concurrency: int) -> list[Worker]:
    """Two workers of the same concurrency for the no-op task, on its own queue; idle while InferQ is measured."""
    from bench.noop_app import NOOP_QUEUE

    return [Worker(stack.env, f"noop{i}-{os.getpid()}", concurrency, stack.log_dir, app="bench.noop_app",
                   queues=NOOP_QUEUE).start() for i in range(2)]


def warm_noop_workers(workers: list[Worker]) -> None:
    from bench.noop_app import noop

    for w in workers:
        w.wait_ready()
    for _ in range(50):
        noop.delay().get(timeout=30)


def noop_round_trips(samples: int) -> list[float]:
    from bench.noop_app import noop

    rtts = []
    for _ in range(samples):
        started = time.perf_counter()
        noop.delay().get(timeout=30)
        rtts.append(time.perf_counter() - started)
    return rtts


def noop_drain(count: int) -> float:
    """Open loop: how fast the two workers drain a backlog of `count` no-op tasks (tasks/s)."""
    from bench.noop_app import noop

    started = time.perf_counter()
    results = [noop.delay() for _ in range(count)]
    for r in results:
        r.get(timeout=60)
    return count / (time.perf_counter() - started)


def floor_figures(rtts: list[float], client_latencies: list[list[float]], seconds: float, drain: float,
                  drain_tasks: int) -> dict:
    done = sum(len(x) for x in client_latencies)
    return {"rtt_p50_ms": percentile(rtts, 50) * 1e3, "rtt_p99_ms": percentile(rtts, 99) * 1e3,
            "rtt_samples": len(rtts), "throughput_per_s": done / seconds,
            "throughput_clients": CLIENTS, "throughput_seconds": seconds,
            "throughput_latency_p50_ms": percentile([v for x in client_latencies for v in x], 50) * 1e3,
            "drain_per_s": drain, "drain_tasks": drain_tasks}


def client_context():
    """The forkserver context the client processes fork from (it imports only the client code)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["bench.run", "bench.noop_app"])
    return ctx


def start_client_server() -> None:
    """Start the forkserver in the background now: it spends seconds importing while the stack starts.
    Call it once REDIS_URL names the bench's Redis (the no-op app reads it on import)."""
    def first_fork() -> None:
        process = client_context().Process(target=time.sleep, args=(0,))
        process.start()
        process.join()

    threading.Thread(target=first_fork, daemon=True).start()


def run_clients(target, per_client: list[tuple], seconds: float) -> list:
    """One process per client running `target(*args, go, seconds, queue)`, all started together; their reports.

    Processes, not threads, so the clients' own Python does not share one GIL; forked from a fresh server
    process that has only imported the client code, so none inherits this process's connections and none
    spends seconds importing it again."""
    ctx = client_context()
    queue, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, go, seconds, queue)) for args in per_client]
    for p in procs:
        p.start()
    for _ in procs:
        assert queue.get(timeout=120) == "ready"
    go.set()
    reports = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    return reports


class RawPredict:
    """predict_proba on one row in this process: on a one-row DataFrame (the model knows feature names) and on a
    bare array. Timed in each alternating round, beside the floor and the jobs it is compared with: measured
    once before them, it was the one part of the latency allowance that saw another machine (0.48 and 1.02 ms
    in two runs 13 minutes apart on 2026-12-07)."""

    def __init__(self, model, rows: np.ndarray):
        import pandas as pd

        self.model = model
        self.inputs = {"frame": pd.DataFrame(rows[:1], columns=list(model.feature_names_in_)),
                       "array": rows[:1].copy()}
        self.times: dict[str, list[float]] = {label: [] for label in self.inputs}

    def measure(self, repeats: int) -> dict[str, float]:
        """Time `repeats` calls on each input (after a few untimed ones); this round's p50 in ms."""
        round_p50 = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for label, x in self.inputs.items():
                for _ in range(20):
                    self.model.predict_proba(x)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    self.model.predict_proba(x)
                    times.append(time.perf_counter() - started)
                self.times[label] += times
                round_p50[label] = percentile(times, 50) * 1e3
        return round_p50

    def figures(self) -> dict:
        return {f"predict_proba_{label}_p50_ms": percentile(times, 50) * 1e3 for label, times in self.times.items()}


def pyarrow_baseline(model_path: Path, csv_path: Path, workdir: Path) -> dict:
    out = workdir / "baseline-output.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "baseline_pyarrow.py"), str(model_path),
                           str(csv_path), str(out)], cwd=ROOT, check=True, capture_output=True, text=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    return report


# ---------------------------------------------------------------- jobs

def _job_client(base: str, token: str, model_id: str, client_no: int, rows: list, go, seconds: float,
                queue) -> None:
    http = JsonConnection(base, token, timeout=30)
    path = f"/api/v1/predict/{model_id}?wait=10"
    queue.put("ready")
    go.wait()
    deadline, done, latencies, errors, i = time.perf_counter() + seconds, [], [], 0, 0
    while (started := time.perf_counter()) < deadline:
        index = i % len(rows)
        i += 1
        status, job = http.post(path, {"instances": [rows[index]]})
        finished = time.perf_counter()
        if status == 200 and job["status"] == "succeeded":
            if finished <= deadline:
                latencies.append(finished - started)
                done.append((index, job["result"]))
        else:
            errors += 1
    queue.put({"client": client_no, "done": done, "latencies": latencies, "errors": errors})


def check_results(model, rows: np.ndarray, done: list) -> int:
    """How many job results differ from the model's own prediction for the same row."""
    import pandas as pd

    if not done:
        return 0
    frame = pd.DataFrame(rows, columns=list(model.feature_names_in_))
    want_labels = model.predict(frame).tolist()
    want_proba = model.predict_proba(frame)
    wrong = 0
    for index, result in done:
        if (result["predictions"] != [want_labels[index]]
                or not np.allclose(result["probabilities"][0], want_proba[index], rtol=0, atol=1e-12)):
            wrong += 1
    return wrong


def job_latencies(client: Client, model_id: str, rows: np.ndarray, samples: int, offset: int = 0) -> list[tuple]:
    """(client latency s, server total ms, server queue ms) of sequential single-row ?wait jobs."""
    http = JsonConnection(client.base, client.token, timeout=30)
    path = f"/api/v1/predict/{model_id}?wait=10"
    bodies = [{"instances": [rows[i % len(rows)].tolist()]} for i in range(offset, offset + samples)]
    out = []
    for body in bodies:
        started = time.perf_counter()
        status, job = http.post(path, body)
        elapsed = time.perf_counter() - started
        assert status == 200 and job["status"] == "succeeded", job
        out.append((elapsed, job["timings"]["total_ms"], job["timings"]["queue_ms"]))
    return out


def latency_figures(samples: list[tuple]) -> dict:
    latencies, server_total, queue_ms = (list(column) for column in zip(*samples))
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3, "samples": len(samples),
            "server_total_p50_ms": percentile(server_total, 50), "server_queue_p50_ms": percentile(queue_ms, 50)}


def job_client_reports(client: Client, model_id: str, seconds: float) -> tuple[list[dict], list[list]]:
    """8 client processes submitting single-row ?wait jobs for `seconds`: their reports, and their rows."""
    rng = np.random.default_rng(11)
    rows = np.round(rng.standard_normal((4000, 30)), 3)
    per_client = [rows[i * 500:(i + 1) * 500].tolist() for i in range(CLIENTS)]
    reports = run_clients(_job_client, [(client.base, client.token, model_id, n, rows_n)
                                        for n, rows_n in enumerate(per_client)], seconds)
    return reports, per_client


def throughput_figures(model, rounds: list[tuple[list[dict], list[list]]], seconds: float) -> dict:
    """Completed jobs/s over every round of `seconds`, each result checked against the model's own answer."""
    reports = [(r, per_client) for reports, per_client in rounds for r in reports]
    done = sum(len(r["done"]) for r, _ in reports)
    wrong = sum(check_results(model, np.asarray(per_client[r["client"]]), r["done"]) for r, per_client in reports)
    latencies = [v for r, _ in reports for v in r["latencies"]]
    total = seconds * len(rounds)
    return {"jobs_per_s": done / total, "completed": done, "seconds": total, "rounds": len(rounds),
            "clients": CLIENTS, "wrong_results": wrong, "errors": sum(r["errors"] for r, _ in reports),
            "latency_p50_ms": percentile(latencies, 50) * 1e3, "latency_p99_ms": percentile(latencies, 99) * 1e3}


def job_throughput(client: Client, model, model_id: str, seconds: float) -> dict:
    return throughput_figures(model, [job_client_reports(client, model_id, seconds)], seconds)


def interleaved(stack: Stack, client: Client, model, model_id: str, rows: np.ndarray, profile: Profile) -> dict:
    """The baselines (raw predict, the no-op floor) and InferQ's jobs in alternating rounds, so that all see the
    same machine: on a shared machine whose speed drifts over minutes, measuring one and then the other skews
    their ratio."""
    rtts, job_samples, noop_clients, job_rounds = [], [], [], []
    rounds = {"predict_frame_p50_ms": [], "rtt_p50_ms": [], "wait_p50_ms": [], "noop_tasks_per_s": [],
              "jobs_per_s": []}
    per_round = profile.latency_samples // profile.rounds
    raw = RawPredict(model, rows)
    for n in range(profile.rounds):
        rounds["predict_frame_p50_ms"].append(raw.measure(profile.predict_samples // profile.rounds)["frame"])
        round_rtts = noop_round_trips(profile.rtt_samples // profile.rounds)
        round_jobs = job_latencies(client, model_id, rows, per_round, offset=n * per_round)
        rtts += round_rtts
        job_samples += round_jobs
        rounds["rtt_p50_ms"].append(percentile(round_rtts, 50) * 1e3)
        rounds["wait_p50_ms"].append(percentile([latency for latency, *_ in round_jobs], 50) * 1e3)
    log("    8-client rounds")
    for _ in range(profile.rounds):
        round_noop = run_clients(_noop_client, [()] * CLIENTS, profile.round_seconds)
        reports, per_client = job_client_reports(client, model_id, profile.round_seconds)
        noop_clients += round_noop
        job_rounds.append((reports, per_client))
        rounds["noop_tasks_per_s"].append(sum(len(x) for x in round_noop) / profile.round_seconds)
        rounds["jobs_per_s"].append(sum(len(r["done"]) for r in reports) / profile.round_seconds)
    log("    no-op drain")
    drain_tasks = 2000 if profile.name == "full" else 300
    floor = floor_figures(rtts, noop_clients, profile.round_seconds * profile.rounds, noop_drain(drain_tasks),
                          drain_tasks)
    return {"raw_predict": raw.figures(), "celery_floor": floor, "job_latency": latency_figures(job_samples),
            "jobs_throughput": throughput_figures(model, job_rounds, profile.round_seconds), "rounds": rounds}


def warm_up(stack: Stack, client: Client, model_id: str, rows: np.ndarray, timeout: float = 120.0) -> int:
    """Until every pool child has imported what scoring needs and answered a job from its cache."""
    children = {c.pid for w in stack.live_workers() for c in w.children()}
    warm: set[int] = set()
    stop = time.monotonic() + timeout

    def loop():
        http = requests.Session()
        http.headers.update(client.http.headers)
        while time.monotonic() < stop and not children <= warm:
            job = http.post(f"{client.base}/api/v1/predict/{model_id}?wait=30",
                            json={"instances": [rows[0].tolist()]}).json()
            if job.get("cache_hit"):
                warm.add(int(job["worker"].rsplit(":", 1)[1]))

    threads = [threading.Thread(target=loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(children & warm)


def cold_warm(client: Client) -> dict:
    """The first job on a freshly uploaded RandomForest against the next one that finds it cached."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 30))
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    model = RandomForestClassifier(n_estimators=100, random_state=0).fit(x, y)
    data = skops_bytes(model)
    version = client.upload_model(data, "forest.skops", f"forest-{uuid.uuid4().hex[:6]}")
    url = f"{client.base}/api/v1/predict/{version['id']}?wait=30"
    row = {"instances": [x[0].tolist()]}

    def one() -> tuple[float, dict]:
        started = time.perf_counter()
        r = client.http.post(url, json=row, timeout=60)
        elapsed = time.perf_counter() - started
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        return elapsed, r.json()

    cold_s, cold = one()
    assert cold["cache_hit"] is False, cold
    next_s, nxt = one()
    warm_s, warm, tries = next_s, nxt, 1
    while not warm["cache_hit"] and tries < 30:  # another pool child took it: it loads the model too
        warm_s, warm = one()
        tries += 1
    return {"model": "RandomForestClassifier(n_estimators=100)", "artifact_bytes": len(data),
            "cold_ms": cold_s * 1e3, "cold_load_ms": cold["timings"]["load_ms"],
            "cold_server_total_ms": cold["timings"]["total_ms"],
            "next_ms": next_s * 1e3, "next_cache_hit": nxt["cache_hit"],
            "warm_ms": warm_s * 1e3, "warm_server_total_ms": warm["timings"]["total_ms"],
            "warm_inference_ms": warm["timings"]["inference_ms"], "jobs_until_warm": tries}


# ---------------------------------------------------------------- batch and uploads

class MultipartBody:
    """A multipart/form-data body streamed from a file (requests sends file-like bodies in blocks)."""

    def __init__(self, fields: dict[str, str], file_field: str, path: Path, filename: str):
        self.boundary = uuid.uuid4().hex
        head = b"".join(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                 f'filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n').encode()
        self.parts = [io.BytesIO(head), open(path, "rb"), io.BytesIO(f"\r\n--{self.boundary}--\r\n".encode())]
        self.length = len(head) + path.stat().st_size + len(f"\r\n--{self.boundary}--\r\n")
        self.sent = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        while self.parts:
            chunk = self.parts[0].read(size)
            if chunk:
                self.sent += len(chunk)
                return chunk
            self.parts.pop(0).close()
        return b""


def post_batch(client: Client, path: Path, model_id: str, **options) -> requests.Response:
    body = MultipartBody({"model": model_id, **{k: str(v).lower() if isinstance(v, bool) else str(v)
                                                 for k, v in options.items()}}, "file", path, path.name)
    return client.http.post(f"{client.base}/api/v1/batches", data=body, timeout=1800,
                            headers={"Content-Type": body.content_type, "Content-Length": str(len(body))})


def wait_batch(client: Client, batch_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.http.get(f"{client.base}/api/v1/batches/{batch_id}", timeout=30).json()
        if batch["status"] not in ("queued", "running"):
            return batch
        time.sleep(0.05)  # the poll's granularity is the instrument's error, not the batch's time
    raise TimeoutError(f"batch {batch_id} did not finish within {timeout}s")


def batch_run(client: Client, model_id: str, csv_path: Path, workdir: Path, rows: int) -> dict:
    """Upload -> downloadable result, the same output columns as the pyarrow script (input + prediction
    + proba_<class>)."""
    started = time.perf_counter()
    r = post_batch(client, csv_path, model_id, include_input=True, probabilities=True)
    assert r.status_code == 202, r.text
    uploaded = time.perf_counter()
    batch = wait_batch(client, r.json()["id"], 1200)
    assert batch["status"] == "succeeded", batch
    scored = time.perf_counter()
    out = client.download_batch(batch["id"], workdir / "batch-result.csv", timeout=600)
    done = time.perf_counter()
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(out)
    columns = table.column_names
    out.unlink()
    assert table.num_rows == rows and batch["rows_done"] == rows, (table.num_rows, batch)
    return {"rows": rows, "seconds": done - started, "rows_per_s": rows / (done - started),
            "upload_s": uploaded - started, "queue_to_done_s": scored - uploaded, "download_s": done - scored,
            "chunks": batch["chunks_total"], "output_columns": len(columns), "bytes_in": csv_path.stat().st_size}


def rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def web_upload_memory(stack: Stack, client: Client, model_id: str, path: Path, small: Path) -> dict:
    """The web processes' resident memory, sampled every 20 ms while a large batch file uploads.

    The web is restarted first: memory that an earlier upload left in a process (allocator pools) would
    hide what this one needs. A small upload to each process then loads what uploads import."""
    stack.restart_web()
    for _ in range(4):
        r = post_batch(client, small, model_id, include_input=False, probabilities=False)
        client.http.delete(f"{client.base}/api/v1/batches/{r.json()['id']}")
    time.sleep(1)
    pids = stack.web_pids()
    before = {pid: rss(pid) for pid in pids}
    peak = dict(before)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for pid in pids:
                peak[pid] = max(peak[pid], rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        r = post_batch(client, path, model_id, include_input=False, probabilities=False)
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    assert r.status_code == 202, r.text
    client.http.delete(f"{client.base}/api/v1/batches/{r.json()['id']}")  # only the upload is measured
    growth = max(peak[pid] - before[pid] for pid in pids)
    return {"upload_bytes": path.stat().st_size, "upload_s": seconds,
            "upload_mb_per_s": path.stat().st_size / seconds / 2**20,
            "web_rss_before_mb": max(before.values()) / 2**20, "web_rss_peak_mb": max(peak.values()) / 2**20,
            "web_rss_growth_mb": growth / 2**20}


def worker_cache_memory(stack: Stack, client: Client, models: list, budget: int) -> dict:
    """Every pool child loads the five models (the cache's count limit); child RSS growth against the budget."""
    children = [c.pid for w in stack.live_workers() for c in w.children()]
    before = {pid: rss(pid) for pid in children}
    with ThreadPoolExecutor(len(models)) as uploads:  # each upload is validated in a sandbox process
        versions = list(uploads.map(lambda i: client.upload_model(skops_bytes(models[i]), "trees.skops",
                                                                 f"mem-{i}-{uuid.uuid4().hex[:6]}"),
                                    range(len(models))))
    log(f"    {len(versions)} models uploaded; every pool child loads each")
    row = {"instances": [np.zeros(30).tolist()]}
    served: dict[int, set] = {pid: set() for pid in children}
    lock = threading.Lock()
    for version in versions:
        url = f"{client.base}/api/v1/predict/{version['id']}?wait=60"
        budget_jobs = [60]

        def loop():
            http = requests.Session()
            http.headers.update(client.http.headers)
            while True:
                with lock:
                    if budget_jobs[0] <= 0 or all(version["id"] in s for s in served.values()):
                        return
                    budget_jobs[0] -= 1
                job = http.post(url, json=row, timeout=120).json()
                pid = int(job["worker"].rsplit(":", 1)[1])
                with lock:
                    served.setdefault(pid, set()).add(version["id"])

        threads = [threading.Thread(target=loop) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    full = [pid for pid in children if len(served.get(pid, ())) == len(versions)]
    after = {pid: rss(pid) for pid in children}
    growth = {pid: after[pid] - before[pid] for pid in children}
    sizes = [len(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)) for m in models]
    worst = max((growth[pid] for pid in full), default=float("nan"))
    return {"children": len(children), "children_with_all_five": len(full), "cache_budget_mb": budget / 2**20,
            "models_estimated_mb": sum(sizes) / 2**20, "model_mb_each": [round(s / 2**20, 1) for s in sizes],
            "child_rss_before_mb": {str(p): round(before[p] / 2**20, 1) for p in children},
            "child_rss_after_mb": {str(p): round(after[p] / 2**20, 1) for p in children},
            "child_rss_growth_max_mb": worst / 2**20}


# ---------------------------------------------------------------- targets and report

def targets(r: dict) -> dict:
    floor, raw = r["celery_floor"], r["raw_predict"]
    t = {}

    def add(name, ratio, ok, rule, per_round=None):
        t[name] = {"ratio": round(ratio, 3), "pass": bool(ok), "rule": rule}
        if per_round:  # the same ratio within each alternating round: how much of a miss is the machine's drift
            t[name]["per_round"] = [round(v, 3) for v in per_round]

    rounds = r["rounds"]
    ratio = r["jobs_throughput"]["jobs_per_s"] / floor["throughput_per_s"]
    add("throughput_vs_celery_noop", ratio, ratio >= 0.7 and r["jobs_throughput"]["wrong_results"] == 0,
        "jobs/s (8 clients) / no-op tasks/s (8 clients) >= 0.7, every result correct",
        [jobs / noop for jobs, noop in zip(rounds["jobs_per_s"], rounds["noop_tasks_per_s"])])
    limit = floor["rtt_p50_ms"] + raw["predict_proba_frame_p50_ms"]
    ratio = r["job_latency"]["p50_ms"] / limit
    add("latency_p50_vs_floor", ratio, ratio <= 2.0, "wait p50 / (no-op round trip p50 + raw predict_proba) <= 2",
        [wait / (rtt + predict) for wait, rtt, predict in zip(rounds["wait_p50_ms"], rounds["rtt_p50_ms"],
                                                              rounds["predict_frame_p50_ms"])])
    ratio = r["batch"]["rows_per_s"] / r["pyarrow_baseline"]["rows_per_s"]
    add("batch_vs_pyarrow", ratio, ratio >= 0.5, "batch rows/s / plain pyarrow script rows/s >= 0.5")
    ratio = r["cold_warm"]["cold_ms"] / r["cold_warm"]["warm_ms"]
    add("warm_vs_cold", ratio, ratio >= 5.0, "cold job latency / warm job latency >= 5")
    mem = r["worker_memory"]
    ratio = mem["child_rss_growth_max_mb"] / mem["cache_budget_mb"]
    add("worker_memory_vs_budget", ratio, mem["children_with_all_five"] > 0 and ratio <= 1.2,
        "worst pool child's RSS growth with five models cached / MODEL_CACHE_BYTES <= 1.2")
    web = r["web_upload_memory"]
    ratio = web["web_rss_growth_mb"] / 100.0
    add("web_memory_during_upload", ratio, ratio < 1.0,
        f"web RSS growth during a {web['upload_bytes'] / 2**30:.2f} GB upload / 100 MB < 1")
    return t


def table(r: dict) -> str:
    f, raw, lat, thr, cw, b, base = (r["celery_floor"], r["raw_predict"], r["job_latency"], r["jobs_throughput"],
                                     r["cold_warm"], r["batch"], r["pyarrow_baseline"])
    mem, web = r["worker_memory"], r["web_upload_memory"]
    rows = [
        ("Celery no-op round trip p50 / p99", f"{f['rtt_p50_ms']:.2f} / {f['rtt_p99_ms']:.2f} ms"),
        ("Celery no-op throughput, 8 clients", f"{f['throughput_per_s']:.0f} tasks/s"),
        ("Celery no-op drain (open loop)", f"{f['drain_per_s']:.0f} tasks/s"),
        ("raw predict_proba, 1 row (DataFrame / array)",
         f"{raw['predict_proba_frame_p50_ms']:.3f} / {raw['predict_proba_array_p50_ms']:.3f} ms"),
        ("(1) job ?wait latency p50 / p99", f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} ms"),
        ("    by the database's clock: insert -> claim / finish",
         f"{lat['server_queue_p50_ms']:.2f} / {lat['server_total_p50_ms']:.2f} ms (p50)"),
        ("(2) jobs/s, 8 clients (wrong results)",
         f"{thr['jobs_per_s']:.0f} jobs/s ({thr['wrong_results']} wrong of {thr['completed']})"),
        ("(3) cold / warm job (RandomForest)", f"{cw['cold_ms']:.1f} / {cw['warm_ms']:.1f} ms "
                                               f"(load {cw['cold_load_ms']:.0f} ms)"),
        ("(4) batch upload -> result", f"{b['rows_per_s']:.0f} rows/s, {b['rows']} rows in {b['seconds']:.1f} s"),
        ("    plain pyarrow script", f"{base['rows_per_s']:.0f} rows/s ({base['seconds']:.1f} s)"),
        ("(5) worker child RSS growth, five models cached",
         f"{mem['child_rss_growth_max_mb']:.0f} MB (budget {mem['cache_budget_mb']:.0f} MB, "
         f"models {mem['models_estimated_mb']:.0f} MB)"),
        ("    web RSS growth during upload",
         f"{web['web_rss_growth_mb']:.1f} MB ({web['upload_bytes'] / 2**20:.0f} MB at "
         f"{web['upload_mb_per_s']:.0f} MB/s)"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"{a:<{width}}  {v}" for a, v in rows]
    lines.append("")
    lines.append(f"{'target':<28} {'ratio':>8}  pass  rule")
    for name, t in r["targets"].items():
        lines.append(f"{name:<28} {t['ratio']:>8.3f}  {'yes' if t['pass'] else 'NO ':<4}  {t['rule']}")
        if "per_round" in t:
            lines.append(f"{'':<28} {'':>8}        each round: {', '.join(f'{v:.2f}' for v in t['per_round'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ~1 minute version (smaller batch and upload)")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("BENCH_WORKER_CONCURRENCY", 2)),
                        help="pool children per worker process (two worker processes)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    run_started = time.perf_counter()
    load_before = os.getloadavg()
    csv_path, model_path = batch_data(profile.batch_rows)
    import joblib

    lr = joblib.load(model_path)
    models = memory_models(profile.memory_trees)
    budget = int(sum(len(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)) for m in models) * 1.05)
    upload_path = large_upload_file(csv_path if profile.name == "full" else batch_data(100_000)[0],
                                    profile.upload_bytes)

    database_url, redis_url = own_services(BENCH_DB, BENCH_REDIS_DB)
    start_client_server()
    workdir = reset_dir(ROOT / "var" / "bench")
    stack = Stack(workdir, database_url, redis_url, workers=2, concurrency=args.concurrency,
                  env_overrides={"MODEL_CACHE_SIZE": "5", "MODEL_CACHE_BYTES": str(budget)})
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"profile": asdict(profile), "worker_processes": 2, "worker_concurrency": args.concurrency,
                     "web": {"processes": stack.web_processes, "threads": stack.web_threads},
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "loadavg_before": [round(v, 2) for v in load_before]}}
    rng = np.random.default_rng(5)
    rows = np.round(rng.standard_normal((1000, 30)), 3)
    noop_workers: list[Worker] = []
    try:
        log("starting the stack and the bare Celery floor's no-op workers")
        noop_workers = start_noop_workers(stack, args.concurrency)  # they start while the stack does
        stack.start()
        warm_noop_workers(noop_workers)
        client = Client(stack.url).register()
        version = client.upload_model(open(model_path, "rb").read(), "model.joblib", "bench-lr")
        log(f"warm-up: {warm_up(stack, client, version['id'], rows)} pool children warm")
        log(f"raw predict, floor and (1) ?wait latency, (2) 8 clients: {profile.rounds} alternating rounds each")
        results.update(interleaved(stack, client, lr, version["id"], rows, profile))
        while noop_workers:
            noop_workers.pop().stop()
        log("(5) worker memory with five models cached")
        results["worker_memory"] = worker_cache_memory(stack, client, models, budget)
        log("(3) cold versus warm")
        results["cold_warm"] = cold_warm(client)
        log("(4) plain pyarrow baseline, then the batch")
        results["pyarrow_baseline"] = pyarrow_baseline(model_path, csv_path, workdir)
        results["batch"] = batch_run(client, version["id"], csv_path, workdir, profile.batch_rows)
        log("(5) web memory during a large upload")
        results["web_upload_memory"] = web_upload_memory(stack, client, version["id"], upload_path,
                                                         small_csv(workdir))
    finally:
        while noop_workers:
            noop_workers.pop().stop()
        stack.stop()
    results["targets"] = targets(results)
    results["run_seconds"] = round(time.perf_counter() - run_started, 1)
    results["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table(results))
    print(f"\n{profile.name} run in {results['run_seconds']:.0f} s; figures in {args.out}")
    if profile is QUICK:
        # one 4 s round and a 100k-row batch (where staging and assembly weigh as much as scoring) are a smoke
        # run: its ratios are shown, but only a wrong result fails it; the targets are judged on `make bench`
        print("quick run: the ratios are indicative; `make bench` judges the targets")
        return 0 if results["jobs_throughput"]["wrong_results"] == 0 else 1
    return 0 if all(t["pass"] for t in results["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
