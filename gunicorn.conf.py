"""gunicorn reads this file from the working directory: the worker class, multiprocess metrics and JSON logs.

The Procfile's and docker-compose's gunicorn command lines say how many processes and threads; this file says
what kind of worker they are and how their metrics add up. prometheus_client decides at import whether it
writes per-process files, so the directory is chosen here, in the master, before any worker imports the app.
"""
import os
import shutil
import tempfile
from pathlib import Path

from gunicorn import glogging


def _metrics_dir() -> Path:
    """PROMETHEUS_MULTIPROC_DIR, else var/metrics/web, else (a read-only checkout, e.g. the image) a temp dir."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).resolve()
    default = Path("var/metrics/web").resolve()
    try:
        default.mkdir(parents=True, exist_ok=True)
        return default
    except OSError:
        return Path(tempfile.gettempdir()) / "inferq-metrics" / "web"


# gthread, except that a request thread answers a keep-alive connection's next request itself (web/server.py)
worker_class = "web.server.KeepAliveThreadWorker"

_metrics_dir = _metrics_dir()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "common.logging.json_formatter", "service": "web"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": os.environ.get("LOG_LEVEL", "INFO").upper(), "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
        # inferq.web.access logs each request (request id, route, status, duration, client address, size;
        # probes and scrapes at DEBUG): gunicorn's own access line would say it twice
        "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
        # alembic (imported by Flask-Migrate) announces each of its plugins at INFO in every new web process
        "alembic.runtime.plugins": {"level": "WARNING", "handlers": [], "propagate": True},
    },
}


class Logger(glogging.Logger):
    """gunicorn's logger, without its access line."""

    def access(self, resp, req, environ, request_time) -> None:
        """Nothing: the app logs each request itself (inferq.web.access), and gunicorn would otherwise format
        every request's atoms only for the gunicorn.access logger to drop them."""


logger_class = Logger


def on_starting(server) -> None:
    """Start from an empty metrics directory: files of an earlier run would be summed in."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)


def child_exit(server, worker) -> None:
    """A finished web process's live gauges stop counting (its counters still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
