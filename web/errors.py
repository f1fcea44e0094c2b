"""One error shape for every failure: {"error": {"code", "message", "details"}}."""
from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import marshmallow as ma
import psycopg
from apispec import BasePlugin
from flask import Flask, jsonify
from flask_smorest import Api
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from common.extensions import db

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client can act on; raised from handlers and rendered as JSON."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers or {}


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    details = ma.fields.Dict()


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   headers: dict[str, str] | None = None):
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return jsonify(body), status, headers or {}


def _code_for(exc: HTTPException) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def _validation_message(messages: dict) -> str:
    """Turn webargs' {location: {field: [msg]}} into one readable sentence."""
    parts = []
    for location, fields in messages.items():
        if isinstance(fields, dict):
            parts += [f"{name}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                      for name, msgs in fields.items()]
        else:
            parts.append(f"{location}: {fields}")
    return "Invalid request. " + "; ".join(parts)


class SharedErrorsPlugin(BasePlugin):
    """Document the errors that operations share, so the spec lists each status code an operation can answer
    instead of a catch-all `default` response."""

    TEXT_IN_PATH = re.compile(r"<(?:(?:string|path)(?:\([^)]*\))?:)?\w+>")

    def operation_helper(self, path: str | None = None, operations: dict | None = None, rule: Any = None,
                         **kwargs: Any) -> None:
        text_in_path = rule is not None and self.TEXT_IN_PATH.search(rule.rule) is not None
        for operation in (operations or {}).values():
            shared = [401] if operation.get("security") else []  # no or bad credentials
            shared += [404] if "{" in (path or "") else []  # no such object, or another user's
            shared += [400, 413] if "requestBody" in operation else []  # unreadable body, too large
            shared += [422] if text_in_path else []  # a text the database cannot hold (a NUL character)
            responses = operation.setdefault("responses", {})
            for status in shared:
                if status not in responses and str(status) not in responses:
                    responses[status] = HTTPStatus(status).name  # flask-smorest registers one per status
            for status, response in responses.items():
                # an error documented by description alone (`alt_response(409, description=...)`) has our body too
                if int(status) >= 400 and isinstance(response, dict) and "content" not in response:
                    response["content"] = {"application/json": {"schema": "Error"}}


class InferQApi(Api):
    """flask-smorest's Api, answering every HTTP error in InferQ's JSON shape and documenting each."""

    ERROR_SCHEMA = ErrorSchema
    DEFAULT_ERROR_RESPONSE_NAME = None

    def _init_spec(self, *, extra_plugins=None, **kwargs):
        super()._init_spec(extra_plugins=[*(extra_plugins or ()), SharedErrorsPlugin()], **kwargs)

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        if error.code == 422 and "messages" in data:
            return error_response(422, "validation_error", _validation_message(data["messages"]),
                                  {"fields": data["messages"]})
        if error.code == 400 and "messages" in data:
            return error_response(400, "bad_request", "The request body is not valid JSON")
        message = data.get("message") or error.description or error.name
        if error.code == 413:
            message = "The request body is larger than this endpoint accepts"
        # the exception's own headers (a 405's Allow, a 401's WWW-Authenticate) stay; the body is ours
        headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        headers.update(data.get("headers") or {})
        if error.code == 429:
            message = f"Too many requests: limit is {error.description}"
        return error_response(error.code or 500, _code_for(error), message, headers=headers)


def register_error_handlers(app: Flask) -> None:
    """ApiError and unexpected exceptions become JSON; a traceback is logged, never sent."""

    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(DataError)
    @app.errorhandler(psycopg.DataError)  # the job insert speaks psycopg directly (web/api/jobs.py)
    def handle_unstorable_value(exc: DataError | psycopg.DataError):
        # PostgreSQL refused a value (SQLSTATE class 22): a NUL character, which JSON strings may hold and text
        # columns may not, or a number out of range. The client sent it; the statement's parameters stay unlogged.
        db.session.rollback()
        cause = exc.orig if isinstance(exc, DataError) else exc
        reason = str(cause).splitlines()[0] if cause is not None else "invalid value"
        log.warning("value refused by the database: %s", reason)
        return error_response(422, "unstorable_value", f"A value in the request cannot be stored: {reason}")

    @app.errorhandler(OperationalError)
    @app.errorhandler(psycopg.OperationalError)
    @app.errorhandler(PoolTimeout)
    def handle_database_unavailable(exc: Exception):
        # PostgreSQL down, restarting or out of connections: nothing the client did, and worth a retry
        reason = str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__]
        log.warning("database unavailable: %s", reason[0])
        return error_response(503, "database_unavailable", "The database cannot be reached right now; retry shortly",
                              headers={"Retry-After": "1"})

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "An internal error occurred; it has been logged")
