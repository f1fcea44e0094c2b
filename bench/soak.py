"""`make soak`: a chaos soak that must lose nothing.

Bounded in time and count, it submits single-row jobs (a few of them on a model that crashes its worker)
and one batch through the real HTTP API while, on a schedule, it SIGKILLs worker pool children, stops a
whole worker and starts another, and restarts Redis (a redis-server the soak started on its own port).
Beat runs the reconciler throughout. A worker (or beat) that exits on its own is started again by the
stack's supervisor, as compose or systemd would, so the run still accounts for everything; but such an exit
is a bug (a worker must survive a Redis restart), so any fails the soak. At the end every job and every
batch row is accounted for:

- each job has exactly one row (submits are retried with the same Idempotency-Key) and reached a final
  status exactly once (a trigger in the soak's database records every final write and result change);
- healthy jobs `succeeded` with the model's own prediction; poisoned ones `failed` with a reason;
- the batch `succeeded`, its output has every row, in input order, with the model's predictions.

The counts are printed, and the report is returned (tests/test_soak.py runs the short plan).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import requests
import sqlalchemy as sa

from bench.stack import ROOT, Client, OwnRedis, Stack, base_urls, fresh_database, free_port, reset_dir
from common.config import sqlalchemy_url

FEATURES = 8


@dataclass(frozen=True)
class Plan:
    name: str
    jobs: int                      # healthy single-row jobs
    poisoned: int                  # jobs on a `fault-crash` model (each kills its worker child until the cap)
    batch_rows: int
    rows_per_chunk: int
    submit_seconds: float          # jobs are spread over this long
    kill_every: float              # SIGKILL a random pool child this often
    replace_at: tuple[float, ...]  # stop a whole worker and start another at these offsets (s)
    redis_restart_at: tuple[float, ...]
    redis_crash_at: tuple[float, ...]  # SIGKILL redis-server (losing up to a second of writes) and restart
    batch_at: float
    drain_seconds: float           # after the chaos, how long everything may take to finish
    clients: int = 8


# A child killed while it holds a job costs that job an attempt (JOB_MAX_ATTEMPTS=3); a fresh child needs
# seconds to import and load its model on a busy 2-core machine, so kills every 3 s exhausted a few healthy
# jobs' attempts (the cap working as designed, not a loss). 6 s keeps the chaos dense without that.
FULL = Plan("full", jobs=3000, poisoned=6, batch_rows=200_000, rows_per_chunk=5000, submit_seconds=100,
            kill_every=6.0, replace_at=(12.0, 60.0), redis_restart_at=(20.0, 80.0), redis_crash_at=(45.0,), batch_at=8.0,
            drain_seconds=150)
SHORT = Plan("short", jobs=400, poisoned=2, batch_rows=30_000, rows_per_chunk=2000, submit_seconds=30,
             kill_every=5.0, replace_at=(8.0,), redis_restart_at=(14.0,), redis_crash_at=(), batch_at=4.0, drain_seconds=120)

SOAK_ENV = {
    "INFERQ_FAULT_INJECTION": "1", "JOB_STUCK_SECONDS": "8", "RECONCILE_INTERVAL_SECONDS": "2",
    "JOB_SOFT_TIME_LIMIT": "30", "JOB_HARD_TIME_LIMIT": "40", "JOB_MAX_ATTEMPTS": "3", "MODEL_CACHE_SIZE": "5",
}

AUDIT_SQL = [
    "DROP TRIGGER IF EXISTS soak_audit ON prediction_jobs",
    "DROP TABLE IF EXISTS soak_audit",
    "CREATE TABLE soak_audit (job_id uuid, old_status text, new_status text, result_changed boolean,"
    " at timestamptz DEFAULT clock_timestamp())",
    """CREATE OR REPLACE FUNCTION soak_audit_fn() RETURNS trigger AS $$ BEGIN
         IF (NEW.status IS DISTINCT FROM OLD.status AND NEW.status IN ('succeeded', 'failed'))
            OR NEW.result::text IS DISTINCT FROM OLD.result::text THEN
           INSERT INTO soak_audit (job_id, old_status, new_status, result_changed)
           VALUES (NEW.id, OLD.status, NEW.status, NEW.result::text IS DISTINCT FROM OLD.result::text);
         END IF;
         RETURN NEW;
       END $$ LANGUAGE plpgsql""",
    "CREATE TRIGGER soak_audit AFTER UPDATE ON prediction_jobs FOR EACH ROW EXECUTE FUNCTION soak_audit_fn()",
]
AUDIT_DROP = ["DROP TRIGGER IF EXISTS soak_audit ON prediction_jobs", "DROP TABLE IF EXISTS soak_audit",
              "DROP FUNCTION IF EXISTS soak_audit_fn()"]


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_model():
    """A small LogisticRegression (no feature names: the jobs send plain rows) and its training data."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((2000, FEATURES)), 3)
    y = np.asarray(["a", "b", "c"])[np.argmax(x[:, :3] + rng.gumbel(size=(2000, 3)) * 0.5, axis=1)]
    return LogisticRegression(max_iter=300).fit(x, y)


def skops_bytes(model) -> bytes:
    import skops.io as sio

    return sio.dumps(model)


def write_batch_csv(path: Path, rows: int) -> np.ndarray:
    rng = np.random.default_rng(2)
    x = np.round(rng.standard_normal((rows, FEATURES)), 3)
    with open(path, "w") as f:
        f.write("row_id," + ",".join(f"x{i}" for i in range(FEATURES)) + "\n")
        for i, row in enumerate(x):
            f.write(f"{i}," + ",".join(repr(float(v)) for v in row) + "\n")
    return x


class Submitter:
    """Client threads submitting jobs at a steady rate; a failed submit is retried with the same key."""

    def __init__(self, client: Client, plan: Plan, healthy_id: str, poisoned_id: str, rows: np.ndarray, run: str):
        self.client, self.plan, self.rows, self.run = client, plan, rows, run
        total = plan.jobs + plan.poisoned
        poisoned_at = set(np.linspace(total * 0.1, total * 0.7, plan.poisoned).astype(int).tolist()) if plan.poisoned else set()
        self.specs = [(i, poisoned_id if i in poisoned_at else healthy_id, i in poisoned_at) for i in range(total)]
        self.job_ids: dict[int, str] = {}
        self.next, self.lock = 0, threading.Lock()
        self.errors: Counter = Counter()
        self.finished_in_wait = 0
        # the soak is bounded in time: past this, jobs are no longer submitted (and count as unsubmitted)
        self.stop_at = float("inf")

    def _take(self) -> int | None:
        with self.lock:
            if self.next >= len(self.specs) or time.monotonic() > self.stop_at:
                return None
            self.next += 1
            return self.next - 1

    def _submit(self, http: requests.Session, i: int) -> None:
        _, model_id, poisoned = self.specs[i]
        body = {"instances": [self.rows[i % len(self.rows)].tolist()]}
        headers = {"Idempotency-Key": f"{self.run}-{i}"}
        url = f"{self.client.base}/api/v1/predict/{model_id}?wait={0 if poisoned else 5}"
        deadline = time.monotonic() + 120
        while True:
            try:
                r = http.post(url, json=body, headers=headers, timeout=30)
                if r.status_code in (200, 202):
                    job = r.json()
                    self.job_ids[i] = job["id"]
                    self.finished_in_wait += job["status"] == "succeeded"
                    return
                self.errors[f"http_{r.status_code}"] += 1
            except requests.RequestException as exc:
                self.errors[type(exc).__name__] += 1
            if time.monotonic() > min(deadline, self.stop_at):
                self.errors["gave_up"] += 1
                return
            time.sleep(0.5)

    def worker(self, started: float) -> None:
        http = requests.Session()
        http.headers.update(self.client.http.headers)
        rate = len(self.specs) / self.plan.submit_seconds
        while (i := self._take()) is not None:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._submit(http, i)

    def start(self, started: float) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.worker, args=(started,), daemon=True)
                   for _ in range(self.plan.clients)]
        for t in threads:
            t.start()
        return threads


class Chaos:
    """Runs the schedule until told to stop: child kills at a period, worker replacements, Redis restarts."""

    def __init__(self, stack: Stack, plan: Plan, seed: int = 0):
        self.stack, self.plan, self.rng = stack, plan, random.Random(seed)
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.batch_status = lambda: None

    def _record(self, t0: float, kind: str, **detail) -> None:
        self.events.append({"t": round(time.monotonic() - t0, 1), "event": kind, "batch": self.batch_status(),
                            **detail})
        log(f"chaos: {kind} {detail or ''}")

    def run(self, started: float) -> None:
        try:
            self._run(started)
        except Exception as exc:  # the soak must fail loudly, not go on without its chaos
            self._record(started, "chaos_error", error=repr(exc))
            raise

    def _run(self, started: float) -> None:
        pending = sorted([(t, "replace_worker") for t in self.plan.replace_at]
                         + [(t, "restart_redis") for t in self.plan.redis_restart_at]
                         + [(t, "crash_redis") for t in self.plan.redis_crash_at])
        next_kill = started + self.plan.kill_every
        while not self.stop.is_set():
            now = time.monotonic()
            if pending and now - started >= pending[0][0]:
                _, kind = pending.pop(0)
                if kind == "replace_worker":
                    old, new = self.stack.replace_worker(self.rng)
                    self._record(started, kind, stopped=old, replacement=new)
                else:
                    down = self.stack.own_redis.restart(down_seconds=1.0, crash=kind == "crash_redis")
                    self._record(started, kind, unreachable_s=round(down, 1))
            elif now >= next_kill:
                pid = self.stack.kill_child(self.rng)
                self._record(started, "sigkill_child", pid=pid)
                next_kill = now + self.plan.kill_every
            self.stop.wait(0.1)

    def counts(self) -> dict:
        return dict(Counter(e["event"] for e in self.events))

    def scheduled_done(self) -> bool:
        kinds = self.counts()
        return (kinds.get("replace_worker", 0) >= len(self.plan.replace_at)
                and kinds.get("restart_redis", 0) >= len(self.plan.redis_restart_at)
                and kinds.get("crash_redis", 0) >= len(self.plan.redis_crash_at))


def wait_final(engine: sa.Engine, owner_email: str, expected: int, seconds: float) -> dict:
    """Until every job of the soak user is final (or `seconds` pass); the last status counts."""
    deadline = time.monotonic() + seconds
    query = sa.text("SELECT j.status, count(*) FROM prediction_jobs j JOIN users u ON u.id = j.owner_id "
                    "WHERE u.email = :email GROUP BY j.status")
    while True:
        with engine.connect() as conn:
            counts = dict(conn.execute(query, {"email": owner_email}).all())
        live = counts.get("queued", 0) + counts.get("running", 0)
        if (live == 0 and sum(counts.values()) >= expected) or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def wait_batch(client: Client, batch_id: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            batch = client.http.get(f"{client.base}/api/v1/batches/{batch_id}", timeout=10).json()
            if batch["status"] not in ("queued", "running") or time.monotonic() > deadline:
                return batch
        except requests.RequestException:
            pass
        time.sleep(0.5)


def check_jobs(engine: sa.Engine, submitter: Submitter, model, rows: np.ndarray) -> dict:
    """Every submitted job: one row, final exactly once, the right answer (or a reason for poisoned ones)."""
    ids = {i: submitter.job_ids.get(i) for i, _, _ in submitter.specs}
    with engine.connect() as conn:
        jobs = {str(r.id): r for r in conn.execute(sa.text(
            "SELECT id, status, result, error, attempts, idempotency_key FROM prediction_jobs "
            "WHERE idempotency_key LIKE :prefix"), {"prefix": f"{submitter.run}-%"})}
        audit = Counter(str(r.job_id) for r in conn.execute(sa.text(
            "SELECT job_id FROM soak_audit WHERE new_status IN ('succeeded', 'failed')")))
        result_writes = Counter(str(r.job_id) for r in conn.execute(sa.text(
            "SELECT job_id FROM soak_audit WHERE result_changed")))
    expected = model.predict(rows).tolist()
    c: Counter = Counter()
    problems: list[str] = []
    for i, model_id, poisoned in submitter.specs:
        job = jobs.get(ids[i]) if ids[i] else None
        if job is None:
            c["missing" if ids[i] else "unsubmitted"] += 1
            if ids[i]:
                problems.append(f"job {i}: no row (id {ids[i]})")
            continue
        c["attempts_gt_1"] += job.attempts > 1
        if audit[ids[i]] != 1 or result_writes[ids[i]] > 1:
            c["not_exactly_once"] += 1
            problems.append(f"job {i} {ids[i]}: {audit[ids[i]]} final writes, {result_writes[ids[i]]} result writes")
        if poisoned:
            ok = job.status == "failed" and bool((job.error or {}).get("code"))
            c["poisoned_failed" if ok else "poisoned_wrong"] += 1
            if not ok:
                problems.append(f"poisoned job {i}: {job.status} {job.error}")
        elif job.status != "succeeded":
            c[f"healthy_{job.status}"] += 1
            problems.append(f"job {i} {ids[i]}: {job.status} {job.error} attempts={job.attempts}")
        elif job.result["predictions"] != [expected[i % len(rows)]]:
            c["wrong_result"] += 1
            problems.append(f"job {i}: predicted {job.result['predictions']}, model says {expected[i % len(rows)]}")
        else:
            c["succeeded"] += 1
    c["rows_for_soak_keys"] = len(jobs)
    c["duplicate_rows"] = len(jobs) - len({r.idempotency_key for r in jobs.values()})
    return {"counts": dict(c), "problems": problems[:30]}


def check_batch(client: Client, batch: dict, model, x: np.ndarray, workdir: Path) -> dict:
    import pyarrow.csv as pacsv

    report = {"status": batch["status"], "rows_total": batch.get("rows_total"), "rows_done": batch.get("rows_done"),
              "rows_failed": batch.get("rows_failed"), "chunks": batch.get("chunks_total"), "error": batch.get("error")}
    if batch["status"] != "succeeded":
        report["ok"] = False
        return report
    out = client.download_batch(batch["id"], workdir / "soak-result.csv", timeout=120)
    table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(column_types={"row_id": "int64"}))
    ids = table.column("row_id").to_numpy()
    predictions = table.column("prediction").to_pylist()
    report.update(output_rows=table.num_rows, in_order=bool(np.array_equal(ids, np.arange(len(x)))),
                  wrong_predictions=int(sum(a != b for a, b in zip(predictions, model.predict(x).tolist()))))
    report["ok"] = (report["output_rows"] == len(x) == batch["rows_done"] and report["in_order"]
                    and report["wrong_predictions"] == 0 and not batch["rows_failed"])
    return report


def reconciler_activity(stack: Stack) -> dict:
    """How often beat sent the reconciler and what it re-enqueued, from the logs."""
    sent = (stack.log_dir / "beat.log").read_text(errors="replace").count("reconcile") if (stack.log_dir / "beat.log").exists() else 0
    totals = Counter()
    for path in stack.log_dir.glob("w*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"message": "reconciled"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                totals.update({key: int(record.get(key, 0)) for key in ("republished", "requeued_lost", "batch_steps")})
    return {"beat_sends": sent, **{key: totals[key] for key in ("republished", "requeued_lost", "batch_steps")}}


def run(plan: Plan, database_url: str, workdir: Path, concurrency: int = 2, keep_database: bool = True) -> dict:
    """Run the soak against `database_url` (migrated) with a Redis of its own; the report."""
    reset_dir(workdir)
    own_redis = OwnRedis(workdir / "redis", free_port()).start()
    engine = sa.create_engine(sqlalchemy_url(database_url), pool_pre_ping=True)
    with engine.begin() as conn:
        for statement in AUDIT_SQL:
            conn.execute(sa.text(statement))
    stack = Stack(workdir, database_url, own_redis.url, workers=2, concurrency=concurrency, web_processes=2,
                  web_threads=8, beat=True, own_redis=own_redis, supervise=True,
                  env_overrides={**SOAK_ENV, "BATCH_ROWS_PER_CHUNK": str(plan.rows_per_chunk)})
    run_id = f"soak-{uuid.uuid4().hex[:8]}"
    report: dict = {"plan": asdict(plan), "run": run_id}
    started_at = time.monotonic()
    try:
        stack.start()
        client = Client(stack.url).register()
        model = make_model()
        healthy = client.upload_model(skops_bytes(model), "model.skops", "soak-lr")
        poisoned = client.upload_model(skops_bytes(model), "model.skops", "fault-crash-soak")
        rows = np.round(np.random.default_rng(3).standard_normal((997, FEATURES)), 3)
        batch_x = write_batch_csv(workdir / "batch.csv", plan.batch_rows)
        submitter = Submitter(client, plan, healthy["id"], poisoned["id"], rows, run_id)
        submitter.stop_at = time.monotonic() + plan.submit_seconds * 2.5 + 30
        chaos = Chaos(stack, plan)
        batch_id: list[str] = []
        chaos.batch_status = lambda: batch_state(client, batch_id)
        started = time.monotonic()
        chaos_thread = threading.Thread(target=chaos.run, args=(started,), daemon=True)
        chaos_thread.start()
        log(f"submitting {plan.jobs} jobs + {plan.poisoned} poisoned over {plan.submit_seconds:.0f} s, "
            f"a {plan.batch_rows}-row batch at {plan.batch_at:.0f} s")
        threads = submitter.start(started)
        time.sleep(max(0.0, started + plan.batch_at - time.monotonic()))
        batch_id.append(submit_batch(client, healthy["id"], workdir / "batch.csv"))
        for t in threads:
            t.join()
        log(f"all {len(submitter.job_ids)} jobs submitted ({dict(submitter.errors) or 'no'} submit errors)")
        while not chaos.scheduled_done() and time.monotonic() - started < plan.submit_seconds + 60:
            time.sleep(0.5)
        batch = wait_batch(client, batch_id[0], 5)
        while batch["status"] in ("queued", "running") and time.monotonic() - started < plan.submit_seconds + 60:
            time.sleep(1)
            batch = wait_batch(client, batch_id[0], 5)
        chaos.stop.set()
        chaos_thread.join()
        chaos_seconds = time.monotonic() - started
        log(f"chaos over after {chaos_seconds:.0f} s: {chaos.counts()}; draining")
        final = wait_final(engine, client.email, len(submitter.job_ids), plan.drain_seconds)
        batch = wait_batch(client, batch_id[0], plan.drain_seconds)
        report.update(
            chaos=chaos.counts(), events=chaos.events, chaos_seconds=round(chaos_seconds, 1),
            submit_errors=dict(submitter.errors), finished_within_wait=submitter.finished_in_wait,
            final_statuses=final, jobs=check_jobs(engine, submitter, model, rows),
            batch=check_batch(client, batch, model, batch_x, workdir), reconciler=reconciler_activity(stack))
    finally:
        stack.stop()
        with engine.begin() as conn:
            for statement in AUDIT_DROP:
                conn.execute(sa.text(statement))
        engine.dispose()
    report["seconds"] = round(time.monotonic() - started_at, 1)
    report["supervisor_restarts"] = stack.restarts
    jobs = report["jobs"]["counts"]
    if jobs.get("unsubmitted"):
        report["jobs"]["problems"].insert(0, f"{jobs['unsubmitted']} jobs not submitted within the time bound "
                                             "(the stack stopped taking them: see the worker logs)")
    if stack.restarts:
        report["jobs"]["problems"].append(f"{len(stack.restarts)} processes exited on their own and were restarted")
    report["ok"] = (jobs.get("succeeded", 0) == plan.jobs and jobs.get("poisoned_failed", 0) == plan.poisoned
                    and jobs.get("not_exactly_once", 0) == 0 and jobs.get("duplicate_rows", 0) == 0
                    and not stack.restarts and report["batch"]["ok"] and chaos_complete(report["chaos"], plan))
    return report


def chaos_complete(counts: dict, plan: Plan) -> bool:
    return (counts.get("sigkill_child", 0) > 0 and not counts.get("chaos_error") and counts.get("replace_worker", 0) == len(plan.replace_at)
            and counts.get("restart_redis", 0) == len(plan.redis_restart_at)
            and counts.get("crash_redis", 0) == len(plan.redis_crash_at))


def batch_state(client: Client, batch_id: list[str]) -> str | None:
    if not batch_id:
        return None
    try:
        b = client.http.get(f"{client.base}/api/v1/batches/{batch_id[0]}", timeout=5).json()
        return f"{b['status']} {b['rows_done']}/{b['rows_total']}"
    except (requests.RequestException, ValueError, KeyError):
        return "unreachable"


def submit_batch(client: Client, model_id: str, path: Path) -> str:
    """Upload the batch (retried while Redis restarts: the upload is repeated, the first 202 counts)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with open(path, "rb") as f:
                r = client.http.post(f"{client.base}/api/v1/batches", files={"file": ("batch.csv", f, "text/csv")},
                                     data={"model": model_id, "id_column": "row_id", "include_input": "false",
                                           "probabilities": "true", "error_policy": "skip"}, timeout=120)
            if r.status_code == 202:
                return r.json()["id"]
            error = f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as exc:
            error = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the batch could not be submitted: {error}")
        time.sleep(1)


def summary(report: dict) -> str:
    j, b, restarts = report["jobs"]["counts"], report["batch"], report["supervisor_restarts"]
    lines = [
        f"soak {report['plan']['name']} ({report['run']}): {'PASS' if report['ok'] else 'FAIL'} in {report['seconds']:.0f} s",
        f"  chaos ({report['chaos_seconds']:.0f} s): {report['chaos']}",
        f"  reconciler: {report['reconciler']}",
        f"  supervisor restarts (processes that exited on their own): {len(restarts)} {restarts or ''}",
        f"  jobs: submitted {report['plan']['jobs']} healthy + {report['plan']['poisoned']} poisoned; "
        f"rows {j.get('rows_for_soak_keys', 0)}, duplicates {j.get('duplicate_rows', 0)}",
        f"        succeeded (right answer) {j.get('succeeded', 0)}, poisoned failed with reason "
        f"{j.get('poisoned_failed', 0)}, wrong {j.get('wrong_result', 0)}, missing {j.get('missing', 0)}, "
        f"unsubmitted {j.get('unsubmitted', 0)}, "
        f"not exactly once {j.get('not_exactly_once', 0)}, retried after a kill {j.get('attempts_gt_1', 0)}",
        f"        other: { {k: v for k, v in j.items() if k.startswith(('healthy_', 'poisoned_wrong'))} or 'none'}; "
        f"final statuses {report['final_statuses']}",
        f"  submit retries: {report['submit_errors'] or 'none'}",
        f"  batch: {b}",
    ]
    for problem in report["jobs"]["problems"][:10]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="the short plan that `make test` runs")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--crash-redis-at", type=float, action="append", default=None,
                        help="also SIGKILL and restart Redis at this offset (s); repeatable")
    parser.add_argument("--out", default=str(ROOT / "var" / "soak-report.json"))
    args = parser.parse_args(argv)
    db_base, redis_base = base_urls()
    database_url = fresh_database(db_base, "inferq_soak", redis_base)
    plan = SHORT if args.short else FULL
    if args.crash_redis_at:
        plan = replace(plan, redis_crash_at=tuple(args.crash_redis_at))
    report = run(plan, database_url, ROOT / "var" / "soak", args.concurrency)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"report: {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
