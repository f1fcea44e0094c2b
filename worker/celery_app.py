"""The one module that builds the Celery app for worker and beat processes."""
from __future__ import annotations

import importlib

import redis
from celery import Celery
from celery.signals import worker_init, worker_process_init
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis

from common.config import Settings
from common.queues import create_celery
from worker import observability  # noqa: F401  (connects the JSON-log and metrics signal handlers)
from worker import runtime

TASK_MODULES = ["worker.tasks.predictions", "worker.tasks.batches", "worker.tasks.maintenance"]
# what loading a skops artifact and scoring it import: ~2 s the first time
SCORING_MODULES = ("skops.io", "sklearn.linear_model", "sklearn.ensemble", "sklearn.tree", "sklearn.neighbors",
                   "sklearn.naive_bayes", "sklearn.svm", "sklearn.pipeline", "sklearn.compose", "sklearn.preprocessing")


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that once its connection is torn down it fails like a lost connection.

    When the broker connection drops, celery 5.7 first collect()s it, which detaches the transport
    (`client = None`) and can leave the task channel half-closed (closing the pidbox channel raised first),
    then close()s it: the task channel is closed again and, restoring its unacked messages, builds a pool
    from the detached transport. That AttributeError ('NoneType' object has no attribute 'hostname')
    escapes every handler and the worker process exits; so does the ack of a task that finishes after
    the reconnect. As a ConnectionError both are ignored or logged like any error of a dead connection,
    and the messages stay in Redis's unacked set for the visibility timeout and the job reconciler, as
    with celery 5.6. (kombu/celery 5.7.0 have no fix; re-check when upgrading.)
    """

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was already closed")
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel


def use_guarded_redis_transport() -> None:
    """Serve redis:// and rediss:// broker URLs with RedisTransport in this process (worker, beat, flower)."""
    for scheme in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:RedisTransport"


def create_worker_app(settings: Settings | None = None) -> Celery:
    use_guarded_redis_transport()
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
