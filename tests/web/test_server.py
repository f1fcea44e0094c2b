"""The web's gunicorn worker (web/server.py) on a live two-process server: keep-alive connections, busy or quiet."""
from __future__ import annotations

import http.client
import time

from tests.live import live_server  # noqa: F401  (fixture)
from web.server import NEXT_REQUEST_WAIT_SECONDS

THREADS = 2 * 4  # tests/live.py: two processes of four threads


def _connect(server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)


def _health(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/health")
    response = conn.getresponse()
    response.read()
    return response.status


def test_the_web_runs_the_keep_alive_worker(live_server):  # noqa: F811
    messages = [record.get("message", "") for record in live_server.log_records()]
    assert "Using worker: web.server.KeepAliveThreadWorker" in messages


def test_requests_sent_back_to_back_on_one_connection_are_each_answered_on_it(live_server):  # noqa: F811
    conn = _connect(live_server)
    assert _health(conn) == 200
    sock = conn.sock
    assert [_health(conn) for _ in range(50)] == [200] * 50
    assert conn.sock is sock  # one connection throughout: none was closed and reopened
    conn.close()


def test_a_connection_quiet_for_longer_than_the_wait_is_still_answered(live_server):  # noqa: F811
    conn = _connect(live_server)
    assert _health(conn) == 200
    sock = conn.sock
    for pause in (NEXT_REQUEST_WAIT_SECONDS * 4, 0.2, 1.0):  # handed back to the event loop, then read from it
        time.sleep(pause)
        assert _health(conn) == 200
    assert conn.sock is sock
    conn.close()


def test_idle_and_closed_connections_leave_threads_for_new_ones(live_server):  # noqa: F811
    """More open, quiet keep-alive connections than the server has threads, and some hung up right after an
    answer: a new connection is answered at once, so none of them holds a thread."""
    idle = [_connect(live_server) for _ in range(THREADS + 4)]
    assert [_health(conn) for conn in idle] == [200] * len(idle)
    for _ in range(THREADS):
        hung_up = _connect(live_server)
        assert _health(hung_up) == 200
        hung_up.close()
    fresh = _connect(live_server)
    started = time.monotonic()
    assert _health(fresh) == 200
    assert time.monotonic() - started < 1.0
    assert [_health(conn) for conn in idle] == [200] * len(idle)  # and the quiet ones are still served
    for conn in idle + [fresh]:
        conn.close()
