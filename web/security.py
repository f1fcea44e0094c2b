"""Who is calling: a bearer JWT or an X-API-Key, resolved to a User for every protected endpoint."""
from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any

import redis
from flask import Flask, current_app, g, request
from flask_jwt_extended import get_jwt_identity, verify_jwt_in_request
from sqlalchemy import select, update

from common.extensions import db, jwt
from common.models import ApiKey, utcnow
from web.errors import ApiError, error_response

API_KEY_HEADER = "X-API-Key"
API_KEY_PREFIX_LEN = 12
SECURITY = [{"bearerAuth": []}, {"apiKey": []}]
BLOCKLIST_PREFIX = "inferq:revoked:"
FAMILY_PREFIX = "inferq:revoked-family:"
# last_used_at is kept to the minute, so a busy key does not write on every request
LAST_USED_RESOLUTION = timedelta(minutes=1)


def redis_client() -> redis.Redis:
    return current_app.extensions["redis"]


@dataclass(frozen=True)
class Caller:
    """Who is calling; only the id, so authenticating costs no database read for a bearer token."""
    id: uuid.UUID


def current_user() -> Caller:
    return g.current_user


def hash_api_key(key: str) -> str:
    # API keys carry 256 random bits, so a fast hash is as strong as a slow one here.
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh key and its lookup prefix; the key is shown once and only its hash is stored."""
    key = "iq_" + secrets.token_urlsafe(32)
    return key, key[:API_KEY_PREFIX_LEN]


def _caller_from_api_key(key: str) -> Caller:
    row = db.session.scalar(select(ApiKey).where(ApiKey.prefix == key[:API_KEY_PREFIX_LEN]))
    if row is None or row.revoked_at is not None or not secrets.compare_digest(row.key_hash, hash_api_key(key)):
        raise ApiError(401, "invalid_api_key", "The API key is invalid or has been revoked")
    if row.last_used_at is None or utcnow() - row.last_used_at > LAST_USED_RESOLUTION:
        db.session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=utcnow()))
        db.session.commit()
    return Caller(row.user_id)


def authenticate() -> Caller:
    """The caller, from X-API-Key if present, else from the bearer access token (signed, so trusted)."""
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return _caller_from_api_key(key)
    verify_jwt_in_request()
    return Caller(uuid.UUID(get_jwt_identity()))


def auth_required(fn: Callable) -> Callable:
    """Protect an endpoint with a bearer token or an API key, and document that in the spec."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        g.current_user = authenticate()
        return fn(*args, **kwargs)

    apidoc = getattr(wrapper, "_apidoc", None) or {}
    wrapper._apidoc = {**apidoc, "manual_doc": {**apidoc.get("manual_doc", {}), "security": SECURITY}}
    return wrapper


def revoke_token(jti: str, expires_in: timedelta) -> None:
    """Put a token's id on the Redis blocklist until the token would expire anyway."""
    seconds = max(int(expires_in.total_seconds()), 1)
    redis_client().set(BLOCKLIST_PREFIX + jti, "1", ex=seconds)


def register_jwt_callbacks(app: Flask) -> None:
    """JWT failures answer in the JSON error shape; a token Redis cannot vouch for is refused (503, retry)."""

    @jwt.token_in_blocklist_loader
    def is_revoked(_header: dict, payload: dict) -> bool:
        try:
            keys = [BLOCKLIST_PREFIX + payload["jti"]]
            if payload.get("fam"):
                keys.append(FAMILY_PREFIX + payload["fam"])
            return redis_client().exists(*keys) > 0
        except redis.RedisError:
            # fail closed, and say why: the token may be fine, so a 401 would send clients to log in again
            raise ApiError(503, "auth_unavailable", "Token revocation cannot be checked right now; retry shortly",
                           headers={"Retry-After": "1"}) from None

    @jwt.unauthorized_loader
    def missing(reason: str):
        return error_response(401, "unauthorized", "Authentication required: send a bearer token or an X-API-Key header")

    @jwt.invalid_token_loader
    def invalid(reason: str):
        return error_response(401, "invalid_token", f"The token is invalid: {reason}")

    @jwt.expired_token_loader
    def expired(_header: dict, _payload: dict):
        return error_response(401, "token_expired", "The token has expired")

    @jwt.revoked_token_loader
    def revoked(_header: dict, _payload: dict):
        return error_response(401, "token_revoked", "The token has been revoked")

    @jwt.user_lookup_error_loader
    def unknown_user(_header: dict, _payload: dict):
        return error_response(401, "invalid_token", "The token's user no longer exists")
