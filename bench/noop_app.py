"""The bare Celery floor: a no-op task on an app with InferQ's broker, serializer and worker options.

Only the result backend is added (on the same Redis), so that `delay().get()` can measure a round trip;
the task runs on its own queue, in separate worker processes started with the same concurrency.
"""
from __future__ import annotations

from common.config import Settings
from common.queues import create_celery

NOOP_QUEUE = "bench-noop"

app = create_celery(Settings.from_env(), "inferq-bench-noop")
app.conf.update(result_backend=app.conf.broker_url, task_ignore_result=False,
                task_routes={"bench.noop": {"queue": NOOP_QUEUE}}, result_expires=600)


@app.task(name="bench.noop")
def noop() -> None:
    return None
