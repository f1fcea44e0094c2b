"""The Flask application factory: settings, extensions, blueprints, error handlers."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from flask import Flask
from flask.sessions import SessionInterface

from common.config import Settings
from common.extensions import DIRECT_SQL, db, jwt, limiter, migrate
from common.queues import create_celery
from common.storage import ArtifactStore
from web.errors import InferQApi, register_error_handlers
from web.job_waiter import JobWaiter
from web.observability import register_observability
from web.publishing import FAIL_FAST, Publisher
from web.security import register_jwt_callbacks

api = InferQApi()
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def create_app(settings: Settings | None = None, **overrides: Any) -> Flask:
    """Build the web app from `settings` (default: the environment)."""
    settings = settings or Settings.from_env(**overrides)
    app = Flask(__name__)
    app.config.from_mapping(flask_config(settings))
    app.session_interface = NoCookieSession()
    app.extensions["settings"] = settings
    register_extensions(app, settings)
    register_blueprints(app)
    register_error_handlers(app)
    register_observability(app)
    return app


class NoCookieSession(SessionInterface):
    """The API is stateless (bearer tokens and API keys): no session cookie to read and sign on every request."""

    def open_session(self, app: Flask, request: Any) -> None:
        return None  # Flask then gives the request a NullSession, which refuses writes

    def save_session(self, app: Flask, session: Any, response: Any) -> None:
        """Nothing to save (Flask does not call it for a NullSession)."""


def flask_config(settings: Settings) -> dict[str, Any]:
    return {
        "SECRET_KEY": settings.secret_key,
        "SQLALCHEMY_DATABASE_URI": settings.database_url,
        "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True, "hide_parameters": True},  # no payload in logged SQL errors
        # the hot path's own pool: autocommit and no pre-ping round trip (web/direct_sql.py)
        "SQLALCHEMY_BINDS": {DIRECT_SQL: {"url": settings.database_url, "isolation_level": "AUTOCOMMIT",
                                          "hide_parameters": True,
                                          "connect_args": {"application_name": "inferq-web-direct"}}},
        "MAX_CONTENT_LENGTH": settings.max_json_bytes,
        "JWT_SECRET_KEY": settings.secret_key,
        "JWT_ACCESS_TOKEN_EXPIRES": timedelta(minutes=settings.access_token_minutes),
        "JWT_REFRESH_TOKEN_EXPIRES": timedelta(days=settings.refresh_token_days),
        "JWT_ALGORITHM": "HS256",
        "JWT_DECODE_ALGORITHMS": ["HS256"],
        "RATELIMIT_STORAGE_URI": settings.redis_url,
        "RATELIMIT_STORAGE_OPTIONS": {"socket_timeout": 5, "socket_connect_timeout": 2},
        # Redis unreachable: each web process counts logins itself until it is back (not a 500, not unlimited)
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
        "RATELIMIT_HEADERS_ENABLED": True,
        "LOGIN_RATE_LIMIT": settings.login_rate_limit,
        "API_TITLE": "InferQ",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/api/v1",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
    }


def register_extensions(app: Flask, settings: Settings) -> None:
    db.init_app(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS_DIR))
    jwt.init_app(app)
    register_jwt_callbacks(app)
    limiter.init_app(app)
    api.init_app(app, spec_kwargs={"components": {"securitySchemes": SECURITY_SCHEMES}})
    app.extensions["redis"] = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    app.extensions["job_waiter"] = JobWaiter(app.extensions["redis"])
    celery = create_celery(settings, "inferq-web")
    celery.conf.broker_transport_options = {**celery.conf.broker_transport_options, **FAIL_FAST}
    app.extensions["celery"] = celery
    app.extensions["publisher"] = Publisher(celery)
    app.extensions["artifact_store"] = ArtifactStore(settings.storage_root)


SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def register_blueprints(app: Flask) -> None:
    from web.api import auth, batches, health, jobs, models
    from web import dashboard
    from web.api import stats

    api.register_blueprint(auth.blp, url_prefix="/api/v1/auth")
    api.register_blueprint(models.blp, url_prefix="/api/v1/models")
    api.register_blueprint(jobs.blp, url_prefix="/api/v1")
    api.register_blueprint(stats.blp, url_prefix="/api/v1")
    api.register_blueprint(batches.blp, url_prefix="/api/v1/batches")
    app.register_blueprint(health.bp)
    app.register_blueprint(dashboard.bp)
