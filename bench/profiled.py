"""pyinstrument inside the stack's processes, without touching web/ or worker/: used by `bench.profile`.

- `web_app()` is the web app (create_app) wrapped in a WSGI middleware that profiles each request;
- importing this module in a celery worker (`-A bench.profiled`) profiles each task in the pool children.

Each process combines its sessions (wall-clock time, waits included) and rewrites
$BENCH_PROFILE_DIR/{web,child}-{pid}.txt every 100 requests or tasks.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from pyinstrument import Profiler
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

INTERVAL = 0.0005
_lock = threading.Lock()
_state: dict = {"session": None, "count": 0, "skipped": 0}
SKIP = 30  # the first requests/tasks of a process (imports, first model load) are the warm-up


def _add(kind: str, session: Session | None) -> None:
    if session is None:
        return
    with _lock:
        if _state["skipped"] < SKIP:
            _state["skipped"] += 1
            return
        _state["session"] = session if _state["session"] is None else Session.combine(_state["session"], session)
        _state["count"] += 1
        if _state["count"] % 50 == 0:
            out = Path(os.environ.get("BENCH_PROFILE_DIR", "var/bench-profile")) / f"{kind}-{os.getpid()}.txt"
            text = ConsoleRenderer(show_all=False, processor_options={"hide_regex": r".*/(threading|selectors)\.py"},
                                   time="percent_of_total").render(_state["session"])
            out.write_text(f"{_state['count']} {kind} profiled\n{text}")


def web_app():
    from web.app import create_app

    app = create_app()
    inner = app.wsgi_app

    def profiled(environ, start_response):
        profiler = Profiler(interval=INTERVAL, async_mode="disabled")
        profiler.start()
        try:
            return inner(environ, start_response)
        finally:
            _add("web", profiler.stop())

    app.wsgi_app = profiled
    return app


def _worker_app():
    from celery.signals import task_postrun, task_prerun

    from worker.celery_app import app

    profilers: dict[str, Profiler] = {}

    @task_prerun.connect(weak=False)
    def _start(task_id=None, **_kw):
        profiler = Profiler(interval=INTERVAL, async_mode="disabled")
        profiler.start()
        profilers[task_id] = profiler

    @task_postrun.connect(weak=False)
    def _stop(task_id=None, **_kw):
        profiler = profilers.pop(task_id, None)
        if profiler is not None:
            _add("child", profiler.stop())

    return app


app = _worker_app() if os.environ.get("BENCH_PROFILE_WORKER") else None
