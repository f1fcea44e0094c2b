"""Who is calling: a bearer JWT or an X-API-Key, resolved to a User for every protected endpoint."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any

import psycopg
from flask import Flask, current_app, g, request
from flask_jwt_extended import get_jwt, get_jwt_header, verify_jwt_in_request
from flask_jwt_extended.exceptions import RevokedTokenError
from jwt import ExpiredSignatureError
from sqlalchemy import select, update

from common.extensions import db, jwt
from common.models import ApiKey, utcnow
from web.direct_sql import fetch_one
from web.errors import ApiError, error_response

API_KEY_HEADER = "X-API-Key"
API_KEY_PREFIX_LEN = 12
SECURITY = [{"bearerAuth": []}, {"apiKey": []}]
# Every token of one login carries its family (the `fam` claim). Logging out, or presenting a spent refresh token,
# marks the family's refresh tokens revoked in PostgreSQL, and with them every token of the family: a revocation
# outlives a Redis restart (Redis holds only messages and wake-ups). NULL, refused too, for a family the database
# does not know (its user deleted, or the database restored from before the login).
LOGIN_VALID = "SELECT bool_and(revoked_at IS NULL) FROM refresh_tokens WHERE family_id = %(login)s"
# last_used_at is kept to the minute, so a busy key does not write on every request
LAST_USED_RESOLUTION = timedelta(minutes=1)


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


class VerifiedTokens:
    """Access tokens this web process has verified, by their Authorization header, least recently used out.

    A client sends the same token on every request until it expires; decoding it and checking its signature
    again is most of what authenticating costs (PyJWT checks every base64 character in Python). A header seen
    before, byte for byte, carries the claims already verified; its expiry and revocation are still checked
    on every request."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._verified: OrderedDict[str, tuple[dict, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, authorization: str) -> tuple[dict, dict] | None:
        with self._lock:
            verified = self._verified.get(authorization)
            if verified is not None:
                self._verified.move_to_end(authorization)
            return verified

    def add(self, authorization: str, header: dict, claims: dict) -> None:
        with self._lock:
            self._verified[authorization] = (header, claims)
            if len(self._verified) > self.size:
                self._verified.popitem(last=False)


def _still_valid(header: dict, claims: dict, defer_revocation: bool) -> None:
    """What can change after a token was verified: the clock and the blocklist (answered as for a fresh token).
    With `defer_revocation` the blocklist is left to the request's write or to its answer (confirm_login)."""
    expires = claims.get("exp")
    if expires is not None and expires + current_app.config["JWT_DECODE_LEEWAY"] <= time.time():
        expired = ExpiredSignatureError("Signature has expired")
        expired.jwt_header, expired.jwt_data = header, claims
        raise expired
    if defer_revocation:
        login_of(claims)  # a token of no login is refused now, as when checked up front
        g.unconfirmed_login = (header, claims)
    elif is_revoked(claims):
        raise RevokedTokenError(header, claims)


def _caller_from_token(defer_revocation: bool) -> Caller:
    authorization = request.headers.get("Authorization", "")
    remembered: VerifiedTokens = current_app.extensions["verified_tokens"]  # per app: per signing key
    verified = remembered.get(authorization) if authorization else None
    if verified is None:
        verify_jwt_in_request()  # signature, expiry, type and revocation; its failures answer 401 (or 503)
        header, claims = get_jwt_header(), get_jwt()
        remembered.add(authorization, header, claims)
    else:
        header, claims = verified
        _still_valid(header, claims, defer_revocation)
    return Caller(uuid.UUID(claims["sub"]))


def authenticate(defer_revocation: bool = False) -> Caller:
    """The caller, from X-API-Key if present, else from the bearer access token (signed, so trusted)."""
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return _caller_from_api_key(key)
    return _caller_from_token(defer_revocation)


def unconfirmed_login() -> uuid.UUID | None:
    """The login whose revocation this request has not checked yet: the write that checks it in the same
    statement calls mark_login_confirmed() once it succeeded."""
    pending = g.get("unconfirmed_login")
    return login_of(pending[1]) if pending else None


def mark_login_confirmed() -> None:
    g.pop("unconfirmed_login", None)


def confirm_login() -> None:
    """Check a deferred revocation now: 401 token_revoked if the login was revoked meanwhile."""
    if (pending := g.pop("unconfirmed_login", None)) is not None:
        header, claims = pending
        if is_revoked(claims):
            raise RevokedTokenError(header, claims)


def auth_required(fn: Callable | None = None, *, revocation_checked_by_write: bool = False) -> Callable:
    """Protect an endpoint with a bearer token or an API key, and document that in the spec.

    `revocation_checked_by_write`: for an endpoint whose one write checks the token's login in the same statement
    (a job's INSERT): a token this process verified before is not checked for revocation up front, which saves a
    database round trip on every submit. Whatever else the endpoint answers, an error included, is answered
    only after the check (a revoked token learns nothing about the account's models)."""
    if fn is None:
        return lambda f: auth_required(f, revocation_checked_by_write=revocation_checked_by_write)

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        g.current_user = authenticate(revocation_checked_by_write)
        try:
            return fn(*args, **kwargs)
        finally:
            confirm_login()  # unless the write checked it: nothing, an error included, leaves unchecked

    apidoc = getattr(wrapper, "_apidoc", None) or {}
    wrapper._apidoc = {**apidoc, "manual_doc": {**apidoc.get("manual_doc", {}), "security": SECURITY}}
    return wrapper


def login_of(payload: dict) -> uuid.UUID:
    """The token's login (family). A token of no login (signed with the key, but not issued by login or refresh)
    could never be revoked, so it is refused."""
    try:
        return uuid.UUID(payload["fam"])
    except (KeyError, TypeError, ValueError):
        raise ApiError(401, "invalid_token", "The token is invalid: it belongs to no login") from None


def is_revoked(payload: dict) -> bool:
    """Whether the token's login was revoked, or is unknown."""
    family = login_of(payload)
    try:
        return not fetch_one(LOGIN_VALID, {"login": family})[0]
    except psycopg.OperationalError:
        # fail closed, and say why: the token may be fine, so a 401 would send clients to log in again
        raise ApiError(503, "auth_unavailable", "Token revocation cannot be checked right now; retry shortly",
                       headers={"Retry-After": "1"}) from None


def register_jwt_callbacks(app: Flask) -> None:
    """JWT failures answer in the JSON error shape; a token whose revocation cannot be checked is refused (503, retry);
    verified tokens are remembered per app, since each app may sign with its own key."""

    app.extensions["verified_tokens"] = VerifiedTokens()
    jwt.token_in_blocklist_loader(lambda _header, payload: is_revoked(payload))

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
