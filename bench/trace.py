"""Where a sequential `?wait` job's time goes, hop by hop, without touching web/ or worker/.

    python -m bench.trace [--jobs 400] [--concurrency 2] [--clients 8 --seconds 5]

Brings up the bench's stack with its web and worker apps wrapped (`web_app()` here, and `-A bench.trace` for
the workers) so that each process appends `job_id stage nanoseconds` to $BENCH_TRACE_DIR/<pid>.txt at fixed
points of a job's path; the client stamps its send and its answer. Prints each hop's p50 over the jobs
(sequential), or the p50 and mean of each hop over every job of N concurrent clients. A job whose rows came
in its message (an idle model's) is scored while its claim is in flight, and its FINISH is sent behind the claim:
its "claim" hop is the scoring (so "model lookup + predict" is negative) and "FINISH" the wait for both answers.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

STAGES = [
    ("client_send", "client sends"),
    ("web_start", "WSGI app called"),
    ("web_insert", "arguments, auth, validation"),
    ("web_inserted", "INSERT"),
    ("web_published", "publish"),
    ("main_received", "Redis -> worker main"),
    ("main_applied", "worker main: request -> pool"),
    ("child_got", "pool -> child"),
    ("child_start", "child: trace setup, prerun"),
    ("child_claimed", "claim"),
    ("child_scored", "model lookup + predict"),
    ("child_finished", "FINISH"),
    ("web_woken", "announce -> waiting web thread"),
    ("web_end", "serialize, log, return"),
    ("client_answer", "response -> client"),
]

_local = threading.local()
_out: dict = {}


def stamp(job_id, stage: str, ns: int | None = None) -> None:
    if (f := _out.get(os.getpid())) is None:
        directory = Path(os.environ.get("BENCH_TRACE_DIR", "var/bench-trace"))
        f = _out[os.getpid()] = open(directory / f"{os.getpid()}.txt", "a", buffering=1)
    f.write(f"{job_id} {stage} {ns or time.time_ns()}\n")


def _after(module, name: str, stage: str, job_of=lambda args, result: args[0]) -> None:
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        result = inner(*args, **kwargs)
        stamp(job_of(args, result), stage)
        return result

    setattr(module, name, wrapper)


def web_app():
    from web.api import jobs
    from web.app import create_app

    app = create_app()
    inner_wsgi = app.wsgi_app

    def traced(environ, start_response):
        _local.started, _local.job = time.time_ns(), None
        try:
            return inner_wsgi(environ, start_response)
        finally:
            if _local.job:
                stamp(_local.job, "web_end")

    inner_insert = jobs._insert_if_servable

    def insert(job_id, *args, **kwargs):
        _local.job = job_id
        stamp(job_id, "web_start", _local.started)
        stamp(job_id, "web_insert")
        job = inner_insert(job_id, *args, **kwargs)
        stamp(job_id, "web_inserted")
        return job

    jobs._insert_if_servable = insert
    _after(jobs, "_enqueue", "web_published", lambda args, _: args[0].id)
    _after(jobs, "publish", "web_sent_message", lambda args, _: args[1])
    inner_await = jobs._await_end

    def await_end(job, *args, **kwargs):
        result = inner_await(job, *args, **kwargs)
        stamp(job.id, "web_woken")
        return result

    jobs._await_end = await_end
    app.wsgi_app = traced
    return app


def _worker_app():
    import celery.app.trace
    from celery.concurrency.asynpool import AsynPool
    from celery.signals import task_prerun, task_received, worker_process_init

    from common.queues import RUN_PREDICTION
    from worker.celery_app import app
    from worker.tasks import predictions

    inner_apply = AsynPool.apply_async

    def apply_async(self, func, args=(), *a, **kw):
        if args[0] == RUN_PREDICTION:  # args: task name, task id, request, body [args, kwargs, embed], ...
            stamp(json.loads(args[3])[0][0], "main_applied")
        return inner_apply(self, func, args, *a, **kw)

    AsynPool.apply_async = apply_async
    inner_trace = celery.app.trace.fast_trace_task

    def fast_trace_task(task, uuid, request, body, *a, **kw):
        if task == RUN_PREDICTION:
            stamp(json.loads(body)[0][0], "child_got")
        return inner_trace(task, uuid, request, body, *a, **kw)

    @worker_process_init.connect(weak=False)
    def in_child(**_kw):  # the main pickles the original by name; the child resolves that name to this
        celery.app.trace.fast_trace_task = fast_trace_task

    @task_received.connect(weak=False)
    def received(request=None, **_kw):
        if request.name == RUN_PREDICTION:
            stamp(request.args[0], "main_received")

    @task_prerun.connect(weak=False)
    def prerun(task=None, args=None, **_kw):
        if task.name == RUN_PREDICTION:
            stamp(args[0], "child_start")

    inner_claim, inner_score = predictions.claim, predictions.score

    def claim(job_id):
        jobs, full = inner_claim(job_id)
        for job in jobs:
            stamp(job.id, "child_claimed")
            stamp(job.id, f"batch_of_{len(jobs)}" if job.id == job_id else "claimed_as_peer")
        return jobs, full

    def score(jobs, *args, **kwargs):
        outcomes = inner_score(jobs, *args, **kwargs)
        for job in jobs:
            stamp(job.id, "child_scored")
        return outcomes

    predictions.claim, predictions.score = claim, score
    inner_pipeline = predictions.runtime.pipeline

    @contextlib.contextmanager
    def pipeline(statement, params):  # a job whose rows came in its message: its claim and FINISH answered together
        job_id = str(params["job_id"])
        with inner_pipeline(statement, params) as sent:
            inner_send, inner_results = sent.send, sent.results

            def send(*args):
                stamp(job_id, "child_claimed")
                stamp(job_id, "batch_of_1")
                inner_send(*args)

            def results():
                answers = inner_results()
                if isinstance(answers[-1], list) and answers[-1]:
                    stamp(job_id, "child_finished")
                return answers

            sent.send, sent.results = send, results
            yield sent

    predictions.runtime.pipeline = pipeline
    inner_execute = predictions.runtime.execute

    def execute(statement, params=None, *a, **kw):
        rows = inner_execute(statement, params, *a, **kw)
        if statement in (predictions.FINISH, predictions.FINISH_CLAIMED_AHEAD):
            for row in rows:
                stamp(row.id, "child_finished")
        return rows

    predictions.runtime.execute = execute
    return app


app = _worker_app() if os.environ.get("BENCH_TRACE_WORKER") and "celery" in sys.argv[0] else None


def read(directory: Path) -> dict[str, dict[str, int]]:
    jobs: dict[str, dict[str, int]] = defaultdict(dict)
    for path in directory.glob("*.txt"):
        for line in path.read_text().splitlines():
            job, stage, ns = line.split()
            jobs[job].setdefault(stage, int(ns))  # the first: a job's own, not a duplicate's
    return jobs


def report(jobs: dict[str, dict[str, int]]) -> None:
    names = [name for name, _ in STAGES]
    complete = [s for s in jobs.values() if all(n in s for n in names)]
    print(f"{len(complete)} of {len(jobs)} jobs with every stage; p50 of each hop (ms):")
    total = 0.0
    for (prev, _), (name, label) in zip(STAGES, STAGES[1:]):
        p50 = statistics.median((s[name] - s[prev]) / 1e6 for s in complete)
        total += p50
        print(f"  {label:<34} {p50:6.3f}")
    end_to_end = statistics.median((s["client_answer"] - s["client_send"]) / 1e6 for s in complete)
    print(f"  {'sum of p50s':<34} {total:6.3f}\n  {'end to end p50':<34} {end_to_end:6.3f}")


LOAD_STAGES = [("client_send", ""), ("web_start", "client -> WSGI app"), ("web_inserted", "auth, validation, INSERT"),
               ("web_published", "publish (or rely on the model's waiting message)"),
               ("child_claimed", "queued until claimed"), ("child_scored", "model lookup + predict"),
               ("child_finished", "FINISH"), ("web_woken", "announce -> waiting web thread"),
               ("web_end", "serialize, log, return"), ("client_answer", "response -> client")]


def _load_client(base: str, token: str, model_id: str, rows: list, go, seconds: float, queue) -> None:
    from bench.stack import JsonConnection

    http = JsonConnection(base, token, timeout=30)
    queue.put("ready")
    go.wait()
    deadline, sent, i = time.perf_counter() + seconds, [], 0
    while time.perf_counter() < deadline:
        started = time.time_ns()
        status, job = http.post(f"/api/v1/predict/{model_id}?wait=10", {"instances": [rows[i % len(rows)]]})
        sent.append((job["id"], started, time.time_ns()))
        i += 1
    queue.put(sent)


def load_report(jobs: dict[str, dict[str, int]], seconds: float) -> None:
    names = [name for name, _ in LOAD_STAGES]
    complete = [s for s in jobs.values() if all(n in s for n in names)]
    print(f"{len(jobs) / seconds:.0f} jobs/s; {len(complete)} of {len(jobs)} jobs with every stage; "
          f"{sum('web_sent_message' in s for s in jobs.values())} sent a message, "
          f"{sum('claimed_as_peer' in s for s in jobs.values())} were claimed as a peer; batches (jobs: count): "
          f"{dict(sorted(Counter(int(k[9:]) for s in jobs.values() for k in s if k.startswith('batch_of_')).items()))}")
    print(f"  {'hop':<50} {'p50':>7} {'mean':>7} (ms)")
    for (prev, _), (name, label) in zip(LOAD_STAGES, LOAD_STAGES[1:]):
        values = [(s[name] - s[prev]) / 1e6 for s in complete]
        print(f"  {label:<50} {statistics.median(values):7.3f} {statistics.fmean(values):7.3f}")


def _with_client_stamps(out_dir: Path, sent: list[tuple[str, int, int]]) -> dict[str, dict[str, int]]:
    """The stages of the jobs the clients sent, with the clients' own send and answer times."""
    time.sleep(0.5)  # the processes' last lines
    jobs = read(out_dir)
    for job_id, started, answered in sent:
        jobs[job_id].update(client_send=started, client_answer=answered)
    return {job_id: jobs[job_id] for job_id, _, _ in sent}


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from bench.run import BENCH_DB, BENCH_REDIS_DB, batch_data, run_clients, start_client_server, warm_up
    from bench.stack import ROOT, Client, JsonConnection, Stack, own_services, reset_dir

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--clients", type=int, default=0, help="instead of sequential jobs: N clients for --seconds")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    _, model_path = batch_data(100_000)
    database_url, redis_url = own_services(BENCH_DB, BENCH_REDIS_DB)
    out_dir = reset_dir(ROOT / "var" / "bench-trace")
    os.environ["BENCH_TRACE_DIR"] = str(out_dir)
    stack = Stack(out_dir / "stack", database_url, redis_url, concurrency=args.concurrency,
                  env_overrides={"BENCH_TRACE_DIR": str(out_dir), "BENCH_TRACE_WORKER": "1"})
    stack.web_app, stack.worker_app = "bench.trace:web_app()", "bench.trace"
    try:
        stack.start()
        client = Client(stack.url).register()
        version = client.upload_model(open(model_path, "rb").read(), "model.joblib", "bench-lr")
        rows = np.round(np.random.default_rng(5).standard_normal((args.jobs, 30)), 3)
        warm_up(stack, client, version["id"], rows)
        if args.clients:
            start_client_server()
            reports = run_clients(_load_client, [(client.base, client.token, version["id"], rows.tolist())
                                                 for _ in range(args.clients)], args.seconds)
            load_report(_with_client_stamps(out_dir, [sent for report in reports for sent in report]), args.seconds)
            return 0
        http = JsonConnection(client.base, client.token, timeout=30)
        url = f"/api/v1/predict/{version['id']}?wait=10"
        sent = []
        for row in rows.tolist():
            started = time.time_ns()
            status, job = http.post(url, {"instances": [row]})
            answered = time.time_ns()
            assert status == 200 and job["status"] == "succeeded", job
            sent.append((job["id"], started, answered))
        report(_with_client_stamps(out_dir, sent))
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
