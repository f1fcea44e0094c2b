"""Request ids, JSON logs and HTTP metrics for every request the web answers, and /metrics."""
from __future__ import annotations

import logging
import time
from typing import Any

from celery.signals import before_task_publish
from flask import Flask, Response, g, has_request_context, request

from common.logging import CONTEXT_HEADER, configure_logging, current_context, request_id_from
from web import metrics

REQUEST_ID_HEADER = "X-Request-ID"
QUIET_ROUTES = {"/health", "/health/ready", "/metrics"}  # probes and scrapes log at DEBUG only
access_log = logging.getLogger("inferq.web.access")


def request_id() -> str:
    """This request's id: the client's X-Request-ID when usable, else one generated once per request."""
    if "request_id" not in g:
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    return g.request_id


def _user_id() -> str | None:
    user = g.get("current_user")
    return str(user.id) if user is not None else None


class RequestContextFilter(logging.Filter):
    """Lines logged while answering a request carry its request id and, once known, the caller's user id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            if not hasattr(record, "request_id"):
                record.request_id = request_id()
            if not hasattr(record, "user_id") and (user_id := _user_id()):
                record.user_id = user_id
        return True


def job_submitted(job: Any) -> None:
    """Count a job just submitted (its row, or a copy of it); the request's access line will name it (one line per submit, not two)."""
    metrics.record_job_submitted(job.model_version_id)
    g.submitted_job = {"job_id": str(job.id), "model_id": str(job.model_version_id)}


def _start_timer() -> None:
    request_id()
    g.request_started = time.perf_counter()


def _route() -> str:
    # the rule template (/api/v1/jobs/<uuid:job_id>), never the raw path: bounded label values
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _record(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = request_id()
    seconds = time.perf_counter() - g.get("request_started", time.perf_counter())
    route = _route()
    metrics.record_request(request.method, route, response.status_code, seconds)
    level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
    if access_log.isEnabledFor(level):
        # written once the server has sent the response and closes it (the client does not wait for the line),
        # when the request context is gone: its request id and user are given here
        fields = {"method": request.method, "path": request.path, "route": route, "status": response.status_code,
                  "duration_ms": round(seconds * 1000, 3), "remote_addr": request.remote_addr,
                  "bytes": response.content_length, "request_id": request_id()}
        if user_id := _user_id():
            fields["user_id"] = user_id
        fields.update(g.get("submitted_job", {}))
        response.call_on_close(lambda: access_log.log(level, "request", extra=fields))
    return response


def _context_for_task(headers: dict | None = None, **_kwargs: object) -> None:
    """A task published while answering a request carries its request id and user to the worker's logs."""
    if headers is not None and has_request_context():
        # what the handler bound around the publish (job_id, model_id, ...) rides along too
        context = {**current_context(), "request_id": request_id(), "user_id": _user_id()}
        headers.setdefault(CONTEXT_HEADER, {k: v for k, v in context.items() if v})


def register_observability(app: Flask) -> None:
    """JSON logs, X-Request-ID on every response, HTTP metrics, and the /metrics endpoint."""
    configure_logging(app.extensions["settings"].log_level, "web", [RequestContextFilter()])
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)  # first, so the timer covers other hooks
    app.after_request(_record)
    app.register_blueprint(metrics.bp)
    before_task_publish.connect(_context_for_task)
