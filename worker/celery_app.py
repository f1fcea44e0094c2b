"""The one module that builds the Celery app for worker and beat processes."""
from __future__ import annotations

import importlib

from celery import Celery
from celery.signals import worker_init, worker_process_init

from common.config import Settings
from common.queues import create_celery
from worker import observability  # noqa: F401  (connects the JSON-log and metrics signal handlers)
from worker import runtime

TASK_MODULES = ["worker.tasks.predictions", "worker.tasks.batches", "worker.tasks.maintenance"]
# what loading a skops artifact and scoring it import (~2 s the first time), and the database driver that
# claims and records a job (~0.5 s: SQLAlchemy loads it with the first engine)
SCORING_MODULES = ("skops.io", "sklearn.linear_model", "sklearn.ensemble", "sklearn.tree", "sklearn.neighbors",
                   "sklearn.naive_bayes", "sklearn.svm", "sklearn.pipeline", "sklearn.compose", "sklearn.preprocessing",
                   "psycopg")


def create_worker_app(settings: Settings | None = None) -> Celery:
    app = create_celery(settings or runtime.settings(), "inferq-worker")
    app.conf.include = TASK_MODULES
    return app


@worker_init.connect
def _preload_scoring_modules(**_kwargs) -> None:
    """Import them in the worker's main process, before its pool forks: every child, and the replacement of
    a killed one, starts warm and shares those pages instead of importing them at its first job."""
    for module in SCORING_MODULES:
        importlib.import_module(module)


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    # a forked child must not reuse the parent's sockets (celery#3238)
    runtime.reset_after_fork()


app = create_worker_app()
