"""schemathesis hooks for InferQ's fuzz runs (loaded with SCHEMATHESIS_HOOKS=tests.fuzz_hooks).

`no_cross_user_access`: in the intruder run (INFERQ_FUZZ_OWNER_OBJECTS names the owner's objects), the
caller is another user, so no answer may be a success that reaches the owner's objects or shows their ids.

`filter_failure` drops two kinds of failure that are not the API's answer to a request it understood:
- gunicorn's own refusal (an HTML 400 or 431) of a request line or headers over its limits: the request never
  reaches the app, whose every answer is JSON;
- a 422 `unstorable_value` for a NUL character, which a JSON string may hold and a PostgreSQL text column may
  not (web/errors.py): the one schema-valid refusal accepted on every operation.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from urllib.parse import unquote

import schemathesis

# identifiers that only the owner's objects have (the model name is not: each user has their own names)
_PRIVATE = ("model_id", "job_id", "batch_id", "key_id", "api_key")


@lru_cache(maxsize=1)
def _owner() -> dict[str, str] | None:
    path = os.environ.get("INFERQ_FUZZ_OWNER_OBJECTS")
    return json.loads(open(path).read()) if path else None


def _names_owner_object(case, owner: dict[str, str]) -> list[str]:
    """The owner's ids and model name that this request's path or query carries."""
    sent = [unquote(str(v)) for v in {**(case.path_parameters or {}), **(case.query or {})}.values()]
    found = [key for key in (*_PRIVATE, "model_name") if any(owner[key] in value for value in sent)]
    body = case.body if isinstance(case.body, dict) else {}
    found += [f"body.{k}" for k, v in body.items() if isinstance(v, str) and owner["model_id"] in v]
    return found


@schemathesis.check
def no_cross_user_access(ctx, response, case):
    """Another user's request never succeeds on the owner's objects, nor sees any of their ids."""
    owner = _owner()
    if owner is None or not 200 <= response.status_code < 300:
        return None
    text = response.text or ""
    leaked = [key for key in _PRIVATE if owner[key] in text]
    if leaked:
        raise AssertionError(f"a 2xx answer to another user shows the owner's {', '.join(leaked)}")
    in_path = [key for key in _PRIVATE if owner[key] in unquote(case.formatted_path)]
    named = _names_owner_object(case, owner)
    # a list filtered by the owner's id, or the aliases of a name, may answer 2xx: empty, as checked above
    if in_path or (named and case.method.upper() != "GET"):
        raise AssertionError(f"another user's {case.method} {case.formatted_path} succeeded "
                             f"({response.status_code}) on the owner's {', '.join(in_path or named)}")
    return None


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but gunicorn's protocol refusals and a schema-valid value PostgreSQL cannot store."""
    if response.status_code in (400, 431) and response.headers.get("content-type", [""])[0].startswith("text/html"):
        return False
    if "positive_data_acceptance" not in getattr(failure, "checks", ()) or response.status_code != 422:
        return True
    try:
        error = response.json()["error"]
        return not (error["code"] == "unstorable_value" and "NUL" in error["message"])
    except (ValueError, KeyError, TypeError):
        return True
