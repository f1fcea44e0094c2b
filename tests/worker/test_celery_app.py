"""The broker transport (common/broker.py) survives the teardown celery 5.7 does when Redis goes away and
publishes through one client per connection pool; workers preload what scoring imports."""
from __future__ import annotations

import contextlib
import logging

from kombu import Connection, Exchange, Queue
from kombu.common import Broadcast, ignore_errors

from bench.stack import OwnRedis


def test_a_dropped_broker_connection_is_torn_down_without_killing_the_worker(tmp_path):
    from common.broker import RedisTransport

    broker = OwnRedis(tmp_path / "redis").start()
    try:
        conn = Connection(broker.url, transport=RedisTransport)
        queue = Queue("jobs", Exchange("", type="direct"), routing_key="jobs")
        with conn.Producer() as producer:
            producer.publish({"job": 1}, exchange=queue.exchange, routing_key="jobs", declare=[queue])
        held = []
        conn.Consumer(queue, callbacks=[lambda _body, message: held.append(message)]).consume()
        # like the worker's remote-control (pidbox) consumer: a second channel, closed first, that fails
        conn.Consumer(Broadcast("control"), channel=conn.channel(), callbacks=[]).consume()
        while not held:  # the first events may be the broadcast subscription's
            conn.drain_events(timeout=5)
        assert len(held) == 1  # unacked, as a running acks_late task's message is
        with contextlib.suppress(TimeoutError):  # then waits for the next one: a BRPOP is in flight
            while True:
                conn.drain_events(timeout=0.2)

        broker.stop()
        # what celery 5.7's Consumer.on_connection_error_after_connected does with the dead connection
        conn.collect(socket_timeout=1)
        ignore_errors(conn, conn.close)
        # the task finishes after the reconnect: its ack on the dead channel is logged, not raised
        held[0].ack_log_error(logging.getLogger("test"), RedisTransport.connection_errors)
    finally:
        broker.stop()


def test_publishing_reuses_one_client_and_recovers_after_a_redis_restart(tmp_path):
    from common.broker import RedisTransport

    broker = OwnRedis(tmp_path / "redis").start()
    try:
        conn = Connection(broker.url, transport=RedisTransport)
        queue = Queue("jobs", Exchange("", type="direct"), routing_key="jobs")

        def publish(n: int) -> None:
            with conn.Producer() as producer:
                producer.publish({"job": n}, exchange=queue.exchange, routing_key="jobs", declare=[queue],
                                 retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2})

        publish(1)
        client = conn.default_channel._pool_client
        publish(2)
        assert conn.default_channel._pool_client is client  # not a new redis.Redis per message
        broker.stop()
        broker.start()
        publish(3)  # its connections to the old server are gone
        got = []
        conn.Consumer(queue, callbacks=[lambda body, message: (got.append(body["job"]), message.ack())]).consume()
        while 3 not in got:
            conn.drain_events(timeout=5)
        assert got in ([3], [1, 2, 3])  # the earlier two only if the server saved them on its way down
        conn.release()
    finally:
        broker.stop()


def test_pool_children_start_with_the_scoring_libraries_already_imported(workers):
    """The main process imports skops, sklearn and the database driver before forking, so a child that
    replaces a killed one can score at once instead of spending seconds on imports: its memory maps sklearn's
    tree extension and psycopg's C extension before it has run any task."""
    import os
    import signal
    import time

    import psutil

    main = psutil.Process(workers[0].proc.pid)
    victim = main.children()[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fresh = [c for c in main.children() if c.pid != victim.pid and c.create_time() > victim.create_time()]
        if fresh:
            break
        time.sleep(0.05)
    assert fresh, "the pool did not replace its killed child"
    mapped = {m.path for m in fresh[0].memory_maps()}
    assert any("sklearn/tree/_tree" in path for path in mapped)
    assert any("psycopg_binary/_psycopg" in path for path in mapped)
