"""The worker's broker transport survives the teardown celery 5.7 does when Redis goes away."""
from __future__ import annotations

import contextlib
import logging

from kombu import Connection, Exchange, Queue
from kombu.common import Broadcast, ignore_errors

from bench.stack import OwnRedis


def test_a_dropped_broker_connection_is_torn_down_without_killing_the_worker(tmp_path):
    from worker.celery_app import RedisTransport

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
