"""Liveness and readiness probes."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from common.extensions import db

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """Alive: answers without touching any dependency."""
    return jsonify(status="ok")


def _check(probe) -> dict:
    try:
        detail = probe()
        return {"ok": True, **(detail or {})}
    except Exception as exc:  # a readiness probe reports every failure, whatever its type
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}


def _workers() -> dict:
    replies = current_app.extensions["celery"].control.ping(timeout=1.0) or []
    if not replies:
        raise RuntimeError("no worker answered a ping within 1s")
    return {"count": len(replies), "names": sorted(name for reply in replies for name in reply)}


@bp.get("/health/ready")
def ready():
    """Ready: PostgreSQL, Redis and at least one worker answer."""
    checks = {
        "database": _check(lambda: db.session.execute(text("SELECT 1")) and None),
        "redis": _check(lambda: current_app.extensions["redis"].ping() and None),
        "workers": _check(_workers),
    }
    healthy = all(c["ok"] for c in checks.values())
    return jsonify(status="ready" if healthy else "unavailable", checks=checks), 200 if healthy else 503
