"""Accounts: register, login, token refresh with rotation, logout, the current user, API keys."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import marshmallow as ma
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from email_validator import EmailNotValidError, validate_email
from flask import current_app
from flask.views import MethodView
from flask_jwt_extended import create_access_token, create_refresh_token, decode_token, get_jwt, jwt_required
from flask_smorest import Blueprint
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from common.extensions import db, limiter
from common.models import ApiKey, RefreshToken, User, utcnow
from web.errors import ApiError, not_found
from web.security import auth_required, current_user, hash_api_key, new_api_key

blp = Blueprint("auth", __name__, description="Accounts, tokens and API keys")
hasher = PasswordHasher()  # argon2id with argon2-cffi's RFC 9106 low-memory defaults
# Verified against when the email is unknown, so both failures take the same time.
_DUMMY_HASH = hasher.hash("not-a-real-password-0")


def check_password_policy(password: str) -> None:
    if not 10 <= len(password) <= 128:
        raise ma.ValidationError("Password must be 10 to 128 characters long.")
    if not any(c.isalpha() for c in password) or not any(c.isdigit() for c in password):
        raise ma.ValidationError("Password must contain at least one letter and one digit.")


def normalise_email(email: str) -> str:
    try:
        return validate_email(email, check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise ma.ValidationError(f"Not a valid email address: {exc}") from None


class CredentialsSchema(ma.Schema):
    email = ma.fields.String(required=True, validate=ma.validate.Length(max=254))
    password = ma.fields.String(required=True, validate=ma.validate.Length(max=1024))


class RegisterSchema(CredentialsSchema):
    email = ma.fields.String(required=True, validate=ma.validate.Length(max=254))
    password = ma.fields.String(required=True, validate=check_password_policy,
                                metadata={"minLength": 10, "maxLength": 128,
                                          "description": "10 to 128 characters, at least one letter and one digit"})

    @ma.post_load
    def normalise(self, data: dict, **_kwargs) -> dict:
        try:
            data["email"] = normalise_email(data["email"])
        except ma.ValidationError as exc:
            raise ma.ValidationError(exc.messages, field_name="email") from None
        return data


class UserSchema(ma.Schema):
    id = ma.fields.UUID(dump_only=True)
    email = ma.fields.String(dump_only=True)
    created_at = ma.fields.DateTime(dump_only=True)


class TokensSchema(ma.Schema):
    access_token = ma.fields.String(required=True)
    refresh_token = ma.fields.String(required=True)
    token_type = ma.fields.String(required=True)
    expires_in = ma.fields.Integer(required=True, metadata={"description": "access token lifetime, seconds"})


class LogoutSchema(ma.Schema):
    refresh_token = ma.fields.String(metadata={"description": "also revoke this refresh token's family"})


class ApiKeyCreateSchema(ma.Schema):
    name = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=100))


class ApiKeySchema(ma.Schema):
    id = ma.fields.UUID(dump_only=True)
    name = ma.fields.String(dump_only=True)
    prefix = ma.fields.String(dump_only=True)
    created_at = ma.fields.DateTime(dump_only=True)
    last_used_at = ma.fields.DateTime(dump_only=True, allow_none=True)
    revoked_at = ma.fields.DateTime(dump_only=True, allow_none=True)


class NewApiKeySchema(ApiKeySchema):
    key = ma.fields.String(dump_only=True, metadata={"description": "shown once; store it now"})


def _issue_tokens(user_id: uuid.UUID, family_id: uuid.UUID) -> dict:
    """A new access token and a new refresh token in `family_id`, recorded for rotation."""
    claims = {"fam": str(family_id)}
    access = create_access_token(identity=str(user_id), additional_claims=claims)
    refresh = create_refresh_token(identity=str(user_id), additional_claims=claims)
    decoded = decode_token(refresh)
    db.session.add(RefreshToken(jti=decoded["jti"], user_id=user_id, family_id=family_id,
                                expires_at=datetime.fromtimestamp(decoded["exp"], timezone.utc)))
    db.session.commit()
    lifetime = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"]
    return {"access_token": access, "refresh_token": refresh, "token_type": "Bearer",
            "expires_in": int(lifetime.total_seconds())}


def _revoke_family(family_id: uuid.UUID) -> None:
    """Revoke every token of a login: its refresh tokens, and so its access tokens still in flight
    (web/security.py: is_revoked)."""
    db.session.execute(update(RefreshToken).where(RefreshToken.family_id == family_id,
                                                  RefreshToken.revoked_at.is_(None)).values(revoked_at=utcnow()))
    db.session.commit()


@blp.route("/register", methods=["POST"])
@blp.arguments(RegisterSchema)
@blp.response(201, UserSchema)
@blp.alt_response(409, description="Email already registered")
def register(data: dict):
    """Create an account."""
    user = User(email=data["email"], password_hash=hasher.hash(data["password"]))
    db.session.add(user)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise ApiError(409, "email_taken", "An account with this email already exists") from None
    return user


@blp.route("/login", methods=["POST"])
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"])
@blp.arguments(CredentialsSchema)
@blp.response(200, TokensSchema)
@blp.alt_response(401, description="Wrong email or password")
@blp.alt_response(429, description="Too many login attempts from this address; see Retry-After")
def login(data: dict):
    """Exchange email and password for an access token and a refresh token."""
    try:
        email = normalise_email(data["email"])
    except ma.ValidationError:
        email = None
    user = db.session.scalar(select(User).where(User.email == email)) if email else None
    try:
        hasher.verify(user.password_hash if user else _DUMMY_HASH, data["password"])
    except (VerificationError, InvalidHashError):
        user = None
    if user is None:
        raise ApiError(401, "invalid_credentials", "Wrong email or password")
    return _issue_tokens(user.id, uuid.uuid4())


@blp.route("/refresh", methods=["POST"])
@jwt_required(refresh=True)
@blp.response(200, TokensSchema)
@blp.doc(security=[{"bearerAuth": []}])
def refresh():
    """Rotate a refresh token: a new pair is issued and the presented token is spent."""
    payload = get_jwt()
    row = db.session.get(RefreshToken, payload["jti"], with_for_update=True)
    if row is None or row.used_at or row.revoked_at:
        _revoke_family(uuid.UUID(payload["fam"]))
        raise ApiError(401, "refresh_token_reused",
                       "This refresh token was already used or revoked; sign in again")
    row.used_at = utcnow()
    return _issue_tokens(row.user_id, row.family_id)


@blp.route("/logout", methods=["POST"])
@jwt_required()
@blp.arguments(LogoutSchema, required=False)  # no body: the presented token's login only
@blp.response(204)
@blp.doc(security=[{"bearerAuth": []}])
def logout(data: dict):
    """Revoke every token of the presented access token's login (its refresh tokens too), and of the given
    refresh token's login."""
    payload = get_jwt()
    if data.get("refresh_token"):
        try:
            refresh_payload = decode_token(data["refresh_token"])
        except Exception:
            raise ApiError(422, "invalid_refresh_token", "refresh_token is not a valid refresh token") from None
        if refresh_payload.get("sub") == payload["sub"] and refresh_payload.get("type") == "refresh":
            _revoke_family(uuid.UUID(refresh_payload["fam"]))
    _revoke_family(uuid.UUID(payload["fam"]))


@blp.route("/me", methods=["GET"])
@blp.response(200, UserSchema)
@auth_required
def me():
    """The signed-in user."""
    user = db.session.get(User, current_user().id)
    if user is None:
        raise ApiError(401, "invalid_token", "The token's user no longer exists")
    return user


@blp.route("/api-keys")
class ApiKeys(MethodView):
    @blp.response(200, ApiKeySchema(many=True))
    @auth_required
    def get(self):
        """List your API keys (never the keys themselves)."""
        return db.session.scalars(select(ApiKey).where(ApiKey.user_id == current_user().id)
                                  .order_by(ApiKey.created_at.desc())).all()

    @blp.arguments(ApiKeyCreateSchema)
    @blp.response(201, NewApiKeySchema)
    @auth_required
    def post(self, data: dict):
        """Create an API key; the key is in this response only."""
        key, prefix = new_api_key()
        row = ApiKey(user_id=current_user().id, name=data["name"], prefix=prefix, key_hash=hash_api_key(key))
        db.session.add(row)
        db.session.commit()
        return {**{name: getattr(row, name) for name in ApiKeySchema().fields}, "key": key}


@blp.route("/api-keys/<uuid:key_id>", methods=["DELETE"])
@blp.response(204)
@auth_required
def revoke_api_key(key_id: uuid.UUID):
    """Revoke an API key."""
    row = db.session.get(ApiKey, key_id)
    if row is None or row.user_id != current_user().id:
        raise not_found("API key")
    row.revoked_at = row.revoked_at or utcnow()
    db.session.commit()
