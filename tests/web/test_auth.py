"""Accounts: registration rules, login, refresh rotation and reuse detection, logout, API keys, rate limit."""
from __future__ import annotations

import time
import uuid
from datetime import timedelta

import jwt as pyjwt
import pytest
from flask_jwt_extended import create_access_token

from tests.conftest import PASSWORD, register


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def error_code(response) -> str:
    return response.json["error"]["code"]


def test_register_normalises_email_and_never_returns_the_hash(client):
    local = f"Mixed.{uuid.uuid4().hex[:8]}"
    response = client.post("/api/v1/auth/register", json={"email": f"{local}@EXAMPLE.com", "password": PASSWORD})
    assert response.status_code == 201
    assert response.json["email"] == f"{local}@example.com".lower()
    assert "password" not in str(response.json) and "hash" not in str(response.json)


def test_password_is_stored_as_argon2id(client, app):
    from common.extensions import db
    from common.models import User

    account = register(client)
    with app.app_context():
        stored = db.session.query(User).filter_by(email=account["email"]).one().password_hash
    assert stored.startswith("$argon2id$")


@pytest.mark.parametrize("body, field", [
    ({"email": "not-an-email", "password": PASSWORD}, "email"),
    ({"email": "a@example.com", "password": "short1"}, "password"),
    ({"email": "a@example.com", "password": "onlyletterslong"}, "password"),
    ({"email": "a@example.com"}, "password"),
    ({"email": 12, "password": PASSWORD}, "email"),
    ({"email": "a@example.com", "password": PASSWORD, "is_admin": True}, "is_admin"),
    ({"email": "a@example.com", "password": PASSWORD, "id": str(uuid.uuid4())}, "id"),
])
def test_register_rejects_bad_input_naming_the_field(client, body, field):
    response = client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 422
    assert field in response.json["error"]["details"]["fields"]["json"]
    assert field in response.json["error"]["message"]


def test_duplicate_email_is_a_conflict(client, user):
    response = client.post("/api/v1/auth/register", json={"email": user["email"].upper(), "password": PASSWORD})
    assert response.status_code == 409 and error_code(response) == "email_taken"


def test_malformed_json_and_wrong_content_type_are_clear_4xx(client):
    bad_json = client.post("/api/v1/auth/login", data="{not json", content_type="application/json")
    assert bad_json.status_code == 400 and error_code(bad_json) == "bad_request"
    as_text = client.post("/api/v1/auth/login", data="email=a", content_type="text/plain")
    assert as_text.status_code in (415, 422) and "error" in as_text.json


def test_oversize_body_is_413_json(client, app):
    huge = "x" * (app.config["MAX_CONTENT_LENGTH"] + 10)
    response = client.post("/api/v1/auth/register", data=huge, content_type="application/json")
    assert response.status_code == 413 and error_code(response) == "request_entity_too_large"


def test_unknown_route_and_method_are_json(client):
    assert client.get("/api/v1/nothing-here").json["error"]["code"] == "not_found"
    response = client.put("/api/v1/auth/login")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"


def test_wrong_password_and_unknown_email_look_the_same(client, user):
    wrong = client.post("/api/v1/auth/login", json={"email": user["email"], "password": "wrong-password-1"})
    unknown = client.post("/api/v1/auth/login", json={"email": "nobody@example.com", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json == unknown.json


def test_me_with_access_token(client, user):
    response = client.get("/api/v1/auth/me", headers=user["headers"])
    assert response.status_code == 200 and response.json["email"] == user["email"]


def test_access_token_lives_15_minutes(client, user):
    claims = pyjwt.decode(user["tokens"]["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 15 * 60 and user["tokens"]["expires_in"] == 900


def test_tokens_cannot_stand_in_for_each_other(client, user):
    as_access = client.get("/api/v1/auth/me", headers=bearer(user["tokens"]["refresh_token"]))
    assert as_access.status_code == 401 and error_code(as_access) == "invalid_token"
    as_refresh = client.post("/api/v1/auth/refresh", headers=bearer(user["tokens"]["access_token"]))
    assert as_refresh.status_code == 401


def test_tampered_expired_and_unsigned_tokens_are_refused(client, app, user):
    token = user["tokens"]["access_token"]
    head, body, sig = token.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}AAAA"
    unsigned = pyjwt.encode(pyjwt.decode(token, options={"verify_signature": False}), key=None, algorithm="none")
    with app.app_context():
        expired = create_access_token(identity=str(uuid.uuid4()), expires_delta=timedelta(seconds=-1))
    for bad in (tampered, unsigned, expired, "garbage"):
        response = client.get("/api/v1/auth/me", headers=bearer(bad))
        assert response.status_code == 401, bad
    assert error_code(client.get("/api/v1/auth/me", headers=bearer(expired))) == "token_expired"
    assert error_code(client.get("/api/v1/auth/me")) == "unauthorized"


def test_refresh_rotates_and_reuse_revokes_the_family(client, user):
    first = user["tokens"]
    second = client.post("/api/v1/auth/refresh", headers=bearer(first["refresh_token"]))
    assert second.status_code == 200
    assert second.json["refresh_token"] != first["refresh_token"]
    assert client.get("/api/v1/auth/me", headers=bearer(second.json["access_token"])).status_code == 200

    reused = client.post("/api/v1/auth/refresh", headers=bearer(first["refresh_token"]))
    assert reused.status_code == 401 and error_code(reused) == "refresh_token_reused"
    # the whole family is dead now: the rotated refresh token and the access tokens
    assert client.post("/api/v1/auth/refresh", headers=bearer(second.json["refresh_token"])).status_code == 401
    assert client.get("/api/v1/auth/me", headers=bearer(second.json["access_token"])).status_code == 401


def test_logout_revokes_access_and_refresh_tokens(client, user):
    tokens = user["tokens"]
    response = client.post("/api/v1/auth/logout", headers=user["headers"],
                           json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 204
    revoked = client.get("/api/v1/auth/me", headers=user["headers"])
    assert revoked.status_code == 401 and error_code(revoked) == "token_revoked"
    assert client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"])).status_code == 401


def test_a_token_verified_before_is_still_refused_once_expired_or_revoked(client, app, user):
    """The web keeps the claims of tokens it has verified; expiry and revocation are checked every time."""
    me = client.get("/api/v1/auth/me", headers=user["headers"]).json
    login = pyjwt.decode(user["tokens"]["access_token"], options={"verify_signature": False})["fam"]
    with app.app_context():
        short = create_access_token(identity=me["id"], expires_delta=timedelta(seconds=2),
                                    additional_claims={"fam": login})
    assert client.get("/api/v1/auth/me", headers=bearer(short)).status_code == 200
    time.sleep(2.5)
    expired = client.get("/api/v1/auth/me", headers=bearer(short))
    assert expired.status_code == 401 and error_code(expired) == "token_expired"

    assert client.post("/api/v1/auth/logout", headers=user["headers"], json={}).status_code == 204
    revoked = client.get("/api/v1/auth/me", headers=user["headers"])
    assert revoked.status_code == 401 and error_code(revoked) == "token_revoked"


def test_a_deleted_accounts_tokens_are_refused_at_once(client, app, user):
    from sqlalchemy import delete

    from common.extensions import db
    from common.models import User

    me = client.get("/api/v1/auth/me", headers=user["headers"]).json
    with app.app_context():
        db.session.execute(delete(User).where(User.id == uuid.UUID(me["id"])))
        db.session.commit()
    refused = client.get("/api/v1/jobs", headers=user["headers"])
    assert refused.status_code == 401 and error_code(refused) == "token_revoked"


def test_a_submit_checks_revocation_in_its_insert_and_a_revoked_token_learns_nothing(client, user, iris_version):
    """The submit checks a remembered token's login in the job's INSERT, not before: once logged out, the token
    creates no job, and its errors (unknown model, wrong row width) are a 401 too, never a 404 or a 422."""
    model, row = iris_version["id"], [5.0, 3.0, 1.5, 0.2]
    submitted = client.post(f"/api/v1/predict/{model}", headers=user["headers"], json={"instances": [row]})
    assert submitted.status_code == 202  # the token is now one this web process has verified
    assert client.post("/api/v1/auth/logout", headers=user["headers"], json={}).status_code == 204

    for ref, instances in ((model, [row]), (model, [row[:2]]), (str(uuid.uuid4()), [row]), ("iris@latest", [row])):
        refused = client.post(f"/api/v1/predict/{ref}?wait=1", headers=user["headers"], json={"instances": instances})
        assert refused.status_code == 401 and error_code(refused) == "token_revoked", (ref, refused.json)
    again = client.post("/api/v1/auth/login", json={"email": user["email"], "password": PASSWORD}).json
    listed = client.get("/api/v1/jobs", headers=bearer(again["access_token"])).json
    assert [job["id"] for job in listed["items"]] == [submitted.json["id"]]


def test_a_signed_token_of_no_login_is_refused(client, app, user):
    """Every accepted token can be revoked: one minted with the key but outside login carries no family."""
    me = client.get("/api/v1/auth/me", headers=user["headers"]).json
    with app.app_context():
        minted = create_access_token(identity=me["id"])
    response = client.get("/api/v1/auth/me", headers=bearer(minted))
    assert response.status_code == 401 and error_code(response) == "invalid_token"


def test_a_token_one_app_verified_is_refused_by_an_app_with_another_key(client, settings, user):
    import dataclasses

    from web.app import create_app

    assert client.get("/api/v1/auth/me", headers=user["headers"]).status_code == 200
    other = create_app(dataclasses.replace(settings, secret_key="another-signing-key-" + "x" * 32)).test_client()
    response = other.get("/api/v1/auth/me", headers=user["headers"])
    assert response.status_code == 401 and error_code(response) == "invalid_token"


def test_a_revoked_token_stays_revoked_when_redis_loses_everything(client, settings, user):
    """Revocations live in PostgreSQL: a web whose Redis holds nothing (restarted without persistence) refuses
    the logged-out tokens all the same."""
    import dataclasses

    from web.app import create_app

    tokens = user["tokens"]
    assert client.post("/api/v1/auth/logout", headers=user["headers"], json={}).status_code == 204
    base, db_number = settings.redis_url.rsplit("/", 1)
    emptied = create_app(dataclasses.replace(settings, redis_url=f"{base}/{int(db_number) - 8}"))
    emptied.extensions["redis"].flushdb()  # the tests' scratch db (as solo_worker's)
    web = emptied.test_client()
    revoked = web.get("/api/v1/auth/me", headers=user["headers"])
    assert revoked.status_code == 401 and error_code(revoked) == "token_revoked"
    refresh = web.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert refresh.status_code == 401 and error_code(refresh) == "token_revoked"
    other = register(client)  # another login is untouched
    assert web.get("/api/v1/auth/me", headers=other["headers"]).status_code == 200


def test_tokens_are_refused_when_revocation_cannot_be_checked(client, app, user):
    """PostgreSQL unreachable: 503 with Retry-After, not a 401 that would send clients to log in again."""
    from sqlalchemy import create_engine

    from common.extensions import DIRECT_SQL, db

    fresh = register(client)["headers"]  # never seen by the web: verified in full
    assert client.get("/api/v1/auth/me", headers=user["headers"]).status_code == 200  # seen before
    with app.app_context():
        engines = db._app_engines[app]
        real = engines[DIRECT_SQL]
        engines[DIRECT_SQL] = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none",
                                            connect_args={"connect_timeout": 1})
    try:
        responses = [client.get("/api/v1/auth/me", headers=headers) for headers in (fresh, user["headers"])]
    finally:
        engines[DIRECT_SQL] = real
    for response in responses:
        assert response.status_code == 503 and error_code(response) == "auth_unavailable"
        assert response.headers["Retry-After"] == "1"


def test_login_works_and_stays_rate_limited_while_redis_is_down(settings, database, user):
    """The login limit's counters live in Redis; without Redis each web process counts for itself."""
    from dataclasses import replace

    from common.extensions import limiter
    from web.app import create_app

    down = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0", login_rate_limit="3 per minute"))
    try:
        web = down.test_client()
        ip = {"REMOTE_ADDR": f"10.8.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
        wrong = {"email": user["email"], "password": "wrong-password-1"}
        assert [web.post("/api/v1/auth/login", json=wrong, environ_base=ip).status_code
                for _ in range(4)] == [401, 401, 401, 429]
        right = web.post("/api/v1/auth/login", json={"email": user["email"], "password": PASSWORD},
                         environ_base={"REMOTE_ADDR": "10.7.0.1"})
        assert right.status_code == 200 and right.json["access_token"]
    finally:  # the limiter is one per process: back on the live Redis for later tests, without waiting for
        # its backoff to re-check Redis (a re-check in the middle of a test would split its counts)
        create_app(settings)
        limiter._storage_dead = False


def test_api_key_lifecycle(client, user):
    created = client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "ci"})
    assert created.status_code == 201
    key = created.json["key"]
    assert key.startswith(created.json["prefix"])
    listed = client.get("/api/v1/auth/api-keys", headers=user["headers"]).json
    assert [k["id"] for k in listed] == [created.json["id"]] and "key" not in listed[0]

    me = client.get("/api/v1/auth/me", headers={"X-API-Key": key})
    assert me.status_code == 200 and me.json["email"] == user["email"]
    assert client.get("/api/v1/auth/me", headers={"X-API-Key": key[:-2] + "zz"}).status_code == 401

    assert client.delete(f"/api/v1/auth/api-keys/{created.json['id']}", headers=user["headers"]).status_code == 204
    revoked = client.get("/api/v1/auth/me", headers={"X-API-Key": key})
    assert revoked.status_code == 401 and error_code(revoked) == "invalid_api_key"


def test_another_users_api_key_is_not_found(client, user, other_user):
    created = client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "mine"}).json
    response = client.delete(f"/api/v1/auth/api-keys/{created['id']}", headers=other_user["headers"])
    assert response.status_code == 404


def test_login_rate_limit_is_shared_through_redis(settings, database, redis_conn, user):
    """Two app instances (as two gunicorn processes) count against one limit held in Redis."""
    from dataclasses import replace

    from web.app import create_app

    limited = replace(settings, login_rate_limit="3 per minute")
    first, second = create_app(limited).test_client(), create_app(limited).test_client()
    ip = {"REMOTE_ADDR": f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
    body = {"email": user["email"], "password": "wrong-password-1"}
    statuses = [c.post("/api/v1/auth/login", json=body, environ_base=ip).status_code
                for c in (first, second, first, second)]
    assert statuses == [401, 401, 401, 429]
    blocked = second.post("/api/v1/auth/login", json=body, environ_base=ip)
    assert blocked.json["error"]["code"] == "too_many_requests"
    assert int(blocked.headers["Retry-After"]) > 0
