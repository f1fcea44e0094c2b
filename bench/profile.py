"""Where a single-row job's time goes: CPU per job in each process of the stack, and py-spy profiles.

    python -m bench.profile [--seconds 20] [--concurrency 2] [--sequential 1000]

Brings up the same stack as `make bench` (database inferq_bench, Redis db 10) beside the bare Celery floor's
no-op workers, and first measures the floor's 8 clients: tasks/s and the whole machine's CPU per task. Then it
runs the 8-client job load twice: once clean, accounting the CPU seconds each group of processes used (web
processes, worker main processes, pool children, the PostgreSQL backends serving the stack, the Redis server)
and the whole machine's (clients and kernel included) per job; once under `py-spy record --gil` (web
processes, worker main processes and pool children; only the thread holding the GIL is sampled, so samples are
CPU), summarised as the functions with the most samples, inclusive, in InferQ's own code and in the libraries,
and as each package's share of the samples' innermost frames. Raw profiles go to var/bench-profile/.

With `--sequential N`, it also compares one client's round trips, as `make bench`'s latency target does:
alternating rounds of N no-op `delay().get()` calls and N single-row `?wait` jobs, each with the CPU that
every group of processes (and this client process) used per round trip, beside the wall time of one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import psutil
import redis

from bench.run import (BENCH_DB, BENCH_REDIS_DB, CLIENTS, _noop_client, batch_data, job_latencies, job_throughput,
                       noop_round_trips, run_clients,
                       start_client_server, start_noop_workers, warm_noop_workers, warm_up)
from bench.stack import ROOT, Client, Stack, own_services, reset_dir


def _postgres_backends(database: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("postgres:") and f" {database} " in f" {cmd} ":
            found.append(proc)
    return found


def _redis_server(url: str) -> list[psutil.Process]:
    port = str(redis.connection.parse_url(url).get("port", 6379))
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "redis-server" and f":{port}" in " ".join(p.info["cmdline"] or [])]


def _groups(stack: Stack) -> dict[str, list[psutil.Process]]:
    workers = stack.live_workers()
    return {
        "web": [psutil.Process(p) for p in stack.web_pids()],
        "worker_main": [psutil.Process(w.proc.pid) for w in workers],
        "worker_children": [c for w in workers for c in w.children()],
        "postgres_backends": _postgres_backends(BENCH_DB),
        "redis": _redis_server(stack.redis_url),
    }


def _machine_cpu() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "softirq", 0.0) + getattr(t, "irq", 0.0)


def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _used(before: dict[str, dict[int, float]], groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds each group used since `before` (a process that came since, e.g. a PostgreSQL backend, from 0)."""
    return {g: sum(t - before.get(g, {}).get(pid, 0.0) for pid, t in _cpu(procs).items())
            for g, procs in groups.items()}


def cpu_per_job(stack: Stack, client: Client, model, model_id: str, seconds: float) -> dict:
    groups = _groups(stack)
    before = {g: _cpu(p) for g, p in groups.items()}
    machine = _machine_cpu()
    wall = time.perf_counter()
    result = job_throughput(client, model, model_id, seconds)
    wall = time.perf_counter() - wall
    machine = _machine_cpu() - machine
    report = {"jobs_per_s": result["jobs_per_s"], "completed": result["completed"], "wrong": result["wrong_results"]}
    jobs = max(result["completed"], 1)
    for g, used in _used(before, _groups(stack)).items():
        report[f"{g}_cpu_ms_per_job"] = round(used / jobs * 1e3, 2)
    report["machine_cpu_ms_per_job"] = round(machine / jobs * 1e3, 2)
    report["machine_busy"] = round(machine / wall / os.cpu_count(), 2)
    return report


def cpu_per_round_trip(groups: Callable[[], dict[str, list[psutil.Process]]], run: Callable[[], int]) -> dict:
    """Run `run` (it returns how many round trips it made, one after the other): wall ms per round trip, and
    CPU ms per round trip of each group, of this process (the client) and of the whole machine."""
    def with_client() -> dict[str, list[psutil.Process]]:
        return {**groups(), "client": [psutil.Process()]}

    before = {g: _cpu(p) for g, p in with_client().items()}
    machine, wall = _machine_cpu(), time.perf_counter()
    count = run()
    wall, machine = time.perf_counter() - wall, _machine_cpu() - machine
    report = {"wall": wall, **_used(before, with_client()), "machine": machine}
    return {k: round(v / count * 1e3, 2) for k, v in report.items()}


def sequential_rounds(stack: Stack, noop_workers: list, client: Client, model_id: str, rows: np.ndarray,
                      count: int, rounds: int = 3) -> None:
    """One client's no-op round trips against its `?wait` jobs, in alternating rounds: ms per round trip."""
    def floor_groups() -> dict[str, list[psutil.Process]]:
        return {"worker_main": [psutil.Process(w.proc.pid) for w in noop_workers],
                "worker_children": [c for w in noop_workers for c in w.children()],
                "redis": _redis_server(stack.redis_url)}

    for n in range(rounds):
        floor = cpu_per_round_trip(floor_groups, lambda: len(noop_round_trips(count)))
        jobs = cpu_per_round_trip(lambda: _groups(stack),
                                  lambda: len(job_latencies(client, model_id, rows, count, offset=n * count)))
        print(f"round {n + 1}, ms per round trip (wall, then CPU by group):")
        print(f"  no-op delay().get(): {floor}")
        print(f"  ?wait job:           {jobs}")


def cpu_per_noop(seconds: float) -> dict:
    """The bare Celery floor's 8 clients: tasks/s and the whole machine's CPU per task."""
    machine, wall = _machine_cpu(), time.perf_counter()
    done = sum(len(x) for x in run_clients(_noop_client, [()] * CLIENTS, seconds))
    machine, wall = _machine_cpu() - machine, time.perf_counter() - wall
    return {"tasks_per_s": round(done / seconds, 1), "machine_cpu_ms_per_task": round(machine / done * 1e3, 2),
            "machine_busy": round(machine / wall / os.cpu_count(), 2)}


def spy(pids: list[int], seconds: float, out_dir: Path, label: str) -> list[subprocess.Popen]:
    procs = []
    for pid in pids:
        out = out_dir / f"{label}-{pid}.txt"
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)),
             "--rate", "250", "--gil", "--format", "raw", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def summarise(files: list[Path], top: int = 25) -> dict:
    """Inclusive samples per function (each function counted once per stack), own code and libraries; and self
    samples per package (the top-level package or module of each stack's innermost frame)."""
    inclusive, self_time, packages, total = Counter(), Counter(), Counter(), 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            seen = set()
            for frame in frames:
                name = _short(frame)
                if name not in seen:
                    inclusive[name] += n
                    seen.add(name)
            self_time[_short(frames[-1])] += n
            packages[_package(frames[-1])] += n
    pct = lambda c: [(name, round(100.0 * n / max(total, 1), 1)) for name, n in c.most_common(top)]
    return {"samples": total, "inclusive_pct": pct(inclusive), "self_pct": pct(self_time),
            "package_pct": pct(packages)}


def _package(frame: str) -> str:
    """'func (werkzeug/wrappers/request.py:42)' -> 'werkzeug'; 'func (threading.py:320)' -> 'threading'."""
    path = frame.partition(" (")[2].rsplit(":", 1)[0]
    return Path(path).parts[0].removesuffix(".py") if path else "?"


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)' with the package directory for our code."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    if "site-packages" in parts:
        i = parts.index("site-packages")
        short = "/".join(parts[i + 1:i + 3])
    elif str(ROOT) in path:
        short = str(Path(path).relative_to(ROOT))
    else:
        short = Path(path).name
    return f"{name} ({short})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--no-spy", action="store_true")
    parser.add_argument("--sequential", type=int, default=0, metavar="N",
                        help="also compare one client's N no-op round trips and N ?wait jobs, in alternating rounds")
    parser.add_argument("--pyinstrument", action="store_true",
                        help="instead of py-spy: profile every request and task inside the processes (bench.profiled)")
    args = parser.parse_args(argv)
    csv_path, model_path = batch_data(100_000)
    model = joblib.load(model_path)
    database_url, redis_url = own_services(BENCH_DB, BENCH_REDIS_DB)
    start_client_server()
    out_dir = reset_dir(ROOT / "var" / "bench-profile")
    stack = Stack(out_dir / "stack", database_url, redis_url, concurrency=args.concurrency,
                  env_overrides={"BENCH_PROFILE_DIR": str(out_dir)})
    if args.pyinstrument:
        stack.web_app, stack.worker_app = "bench.profiled:web_app()", "bench.profiled"
        stack.env_overrides["BENCH_PROFILE_WORKER"] = "1"
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    noop_workers = []
    try:
        noop_workers = start_noop_workers(stack, args.concurrency)
        stack.start()
        warm_noop_workers(noop_workers)
        print("the bare Celery floor, 8 clients:")
        for k, v in cpu_per_noop(args.seconds).items():
            print(f"  {k}: {v}")
        client = Client(stack.url).register()
        version = client.upload_model(open(model_path, "rb").read(), "model.joblib", "bench-lr")
        rows = np.round(np.random.default_rng(5).standard_normal((100, 30)), 3)
        warm_up(stack, client, version["id"], rows)
        if args.sequential:
            sequential_rounds(stack, noop_workers, client, version["id"], rows, args.sequential)
        while noop_workers:  # idle from here on
            noop_workers.pop().stop()
        print("CPU per job, clean run:")
        clean = cpu_per_job(stack, client, model, version["id"], args.seconds)
        for k, v in clean.items():
            print(f"  {k}: {v}")
        if args.pyinstrument:
            for path in sorted(out_dir.glob("*.txt")):
                print(f"\n===== {path.name}")
                print(path.read_text())
        elif not args.no_spy:
            groups = {"web": stack.web_pids(), "main": [w.proc.pid for w in stack.live_workers()],
                      "child": [c.pid for w in stack.live_workers() for c in w.children()]}
            spies = [p for label, pids in groups.items() for p in spy(pids, args.seconds + 3, out_dir, label)]
            time.sleep(1)
            job_throughput(client, model, version["id"], args.seconds)
            for p in spies:
                p.wait(60)
            for label in groups:
                s = summarise(sorted(out_dir.glob(f"{label}-*.txt")))
                print(f"\n{label}: {s['samples']} samples; inclusive % (top):")
                for name, p in s["inclusive_pct"]:
                    print(f"  {p:5.1f}  {name}")
                print(f"{label}: self % (top):")
                for name, p in s["self_pct"][:12]:
                    print(f"  {p:5.1f}  {name}")
                print(f"{label}: self % by package:")
                for name, p in s["package_pct"][:15]:
                    print(f"  {p:5.1f}  {name}")
    finally:
        while noop_workers:
            noop_workers.pop().stop()
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
