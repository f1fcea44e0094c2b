"""kombu's Redis transport as InferQ's processes use it (web, worker, beat, flower): two changes, both below."""
from __future__ import annotations

from contextlib import contextmanager

import redis
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that it publishes through one client and that once its connection is
    torn down it fails like a lost connection.

    One client: kombu builds a new redis.Redis (and its table of ~200 response callbacks) for every message
    it publishes, which was a tenth of the web's CPU per submitted job; a client is only a handle on the
    channel's connection pool, so one per pool serves the same connections.

    Torn down: when the broker connection drops, celery 5.7 first collect()s it, which detaches the
    transport (`client = None`) and can leave the task channel half-closed (closing the pidbox channel
    raised first), then close()s it: the task channel is closed again and, restoring its unacked messages,
    builds a pool from the detached transport. That AttributeError ('NoneType' object has no attribute
    'hostname') escapes every handler and the worker process exits; so does the ack of a task that
    finishes after the reconnect. As a ConnectionError both are ignored or logged like any error of a dead
    connection, and the messages stay in Redis's unacked set for the visibility timeout and the job
    reconciler, as with celery 5.6. (kombu/celery 5.7.0 have no fix; re-check when upgrading.)
    """

    _pool_client: redis.Redis | None = None

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was already closed")
        return super()._connparams(asynchronous=asynchronous)

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        pool = self.pool  # a closed channel drops its pool: the next one gets a client of its own
        if self._pool_client is None or self._pool_client.connection_pool is not pool:
            self._pool_client = self._create_client()
        yield self._pool_client


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel


def use_inferq_redis_transport() -> None:
    """Serve redis:// and rediss:// broker URLs with RedisTransport in this process."""
    for scheme in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:RedisTransport"
