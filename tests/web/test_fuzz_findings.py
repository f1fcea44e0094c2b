"""What the schemathesis runs (tests/test_fuzz.py) found, pinned down as plain requests."""
from __future__ import annotations

import pytest

from tests.conftest import upload


@pytest.fixture
def iris_version(client, user, iris_model) -> dict:
    return upload(client, user["headers"], iris_model[0], name="edges")


def test_a_nul_character_is_a_422_not_a_500(client, user):
    response = client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "a\u0000b"})
    assert response.status_code == 422, response.json
    assert response.json["error"]["code"] == "unstorable_value" and "NUL" in response.json["error"]["message"]
    # the session was rolled back: the same user goes on working
    assert client.post("/api/v1/auth/api-keys", headers=user["headers"], json={"name": "ok"}).status_code == 201
    # a NUL in a name in the path too, and the spec says so
    in_path = client.get("/api/v1/models/by-name/a%00b/aliases", headers=user["headers"])
    assert in_path.status_code == 422 and in_path.json["error"]["code"] == "unstorable_value"
    spec = client.get("/api/v1/openapi.json").json["paths"]
    assert "422" in spec["/api/v1/models/by-name/{name}/aliases"]["get"]["responses"]


def test_versions_beyond_32_bits_are_refused_or_not_found(client, user, iris_version):
    name = iris_version["name"]
    too_big = client.put(f"/api/v1/models/by-name/{name}/aliases/prod", headers=user["headers"],
                         json={"version": 2**31})
    assert too_big.status_code == 422 and too_big.json["error"]["code"] == "validation_error"
    missing = client.post(f"/api/v1/predict/{name}@v99999999999", headers=user["headers"],
                          json={"instances": [[1.0, 2.0, 3.0, 4.0]]})
    assert missing.status_code == 404, missing.json


def test_a_405_names_the_allowed_methods(client, user):
    response = client.open("/api/v1/auth/me", method="TRACE", headers=user["headers"])
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


def test_bodies_the_spec_calls_optional_are(client, user, iris_version):
    spec = client.get("/api/v1/openapi.json").json["paths"]
    assert not spec["/api/v1/auth/logout"]["post"]["requestBody"].get("required")
    assert not spec["/api/v1/models/{model_id}"]["patch"]["requestBody"].get("required")
    patched = client.patch(f"/api/v1/models/{iris_version['id']}", headers=user["headers"])
    assert patched.status_code == 200 and patched.json["description"] == iris_version["description"]
    assert client.post("/api/v1/auth/logout", headers=user["headers"]).status_code == 204
    assert client.get("/api/v1/auth/me", headers=user["headers"]).status_code == 401


def test_the_spec_documents_what_validation_enforces(client):
    spec = client.get("/api/v1/openapi.json").json
    schemas = spec["components"]["schemas"]
    instances = schemas["PredictRequest"]["properties"]["instances"]
    assert instances["minItems"] == 1 and {"type": "array"} in instances["items"]["anyOf"]
    password = schemas["Register"]["properties"]["password"]
    assert (password["minLength"], password["maxLength"]) == (10, 128)
    assert schemas["AliasSet"]["properties"]["version"]["maximum"] == 2**31 - 1


def test_every_operation_lists_its_error_codes(client):
    """No catch-all `default`: each operation names its statuses, errors in the one error shape."""
    spec = client.get("/api/v1/openapi.json").json
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            assert "default" not in responses, (method, path)
            if operation.get("security"):
                assert "401" in responses, (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]] \
                        if "$ref" in response else response
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
