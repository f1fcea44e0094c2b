"""The web's gunicorn worker (gunicorn.conf.py): gthread, with one change for clients that send request after request."""
from __future__ import annotations

import select
import socket

from gunicorn.workers.gthread import TConn, ThreadWorker

# How long a request thread that has answered on a keep-alive connection waits for that connection's next
# request before handing the connection back to the worker's event loop. Long enough for a client sending one
# request after another (well under a millisecond apart); short enough that an idle connection holds a thread
# for no noticeable time.
NEXT_REQUEST_WAIT_SECONDS = 0.005


def _readable(sock: socket.socket, seconds: float) -> bool:
    poller = select.poll()  # not select(): it fails on descriptors above 1023
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


class KeepAliveThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, except that a request thread keeps a keep-alive connection for
    NEXT_REQUEST_WAIT_SECONDS after answering it, and answers the next request itself if one arrives.

    In gthread every request on a kept-alive connection first wakes the worker's event loop, which hands the
    connection to a thread: two wake-ups and a thread hand-off before the app is called. A lone client's
    `?wait` job waits through them on every request (bench/README.md: 4-5% of its latency on a 2-core machine),
    and under load they are CPU the requests share. A connection that stays quiet goes back to the event loop
    as before, and keep-alive timeouts, max-requests and graceful shutdown work as in gthread."""

    def handle(self, conn: TConn) -> tuple[bool, TConn]:
        keepalive, conn = super().handle(conn)
        while keepalive and self.alive and not self.cfg.is_ssl and _readable(conn.sock, NEXT_REQUEST_WAIT_SECONDS):
            keepalive, conn = super().handle(conn)  # TLS may buffer a request the socket does not show: not here
        return keepalive, conn
