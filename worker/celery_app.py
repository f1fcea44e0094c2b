"""The one module that builds the Celery app for worker and beat processes."""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from common.config import Settings
from common.queues import create_celery
from worker import observability  # noqa: F401  (connects the JSON-log and metrics signal handlers)
from worker import runtime

TASK_MODULES = ["worker.tasks.predictions", "worker.tasks.batches", "worker.tasks.maintenance"]


def create_worker_app(settings: Settings | None = None) -> Celery:
    app = create_celery(settings or runtime.settings(), "inferq-worker")
    app.conf.include = TASK_MODULES
    return app


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    # a forked child must not reuse the parent's sockets (celery#3238)
    runtime.reset_after_fork()


app = create_worker_app()
