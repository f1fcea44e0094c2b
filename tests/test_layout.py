"""The deployment files and the migrations agree with the code."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def shape(command: str) -> tuple:
    """Program, subcommands, app target and option names: what must agree (values may differ)."""
    words = command.replace('"', " ").split()
    flags = {re.split(r"[= ]", w)[0] for w in words if w.startswith("-")}
    targets = {w for w in words if w in {"worker", "beat", "flower", "db", "upgrade"} or "app" in w}
    return words[0], frozenset(flags), frozenset(targets)


def test_procfile_and_compose_run_the_same_processes():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    processes = procfile()
    assert set(processes) == {"release", "web", "worker", "beat", "flower"}
    for name, command in processes.items():
        assert shape(compose[name]["command"]) == shape(command), name


def test_models_and_migrations_agree(database, test_env):
    result = subprocess.run([sys.executable, "-m", "flask", "db", "check"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, **test_env, "FLASK_APP": "web.app:create_app"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_openapi_spec_is_valid_and_documents_auth(client):
    from openapi_spec_validator import validate

    spec = client.get("/api/v1/openapi.json").json
    validate(spec)
    assert {"bearerAuth", "apiKey"} <= set(spec["components"]["securitySchemes"])
    assert spec["paths"]["/api/v1/auth/me"]["get"]["security"]
    assert client.get("/api/v1/docs").status_code == 200


def test_production_refuses_the_default_secret():
    from common.config import ConfigError, Settings

    env = {"INFERQ_ENV": "production", "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"}
    try:
        Settings.from_env(env)
    except ConfigError as exc:
        assert "SECRET_KEY" in str(exc)
    else:
        raise AssertionError("production started with the default secret key")
    assert Settings.from_env({**env, "SECRET_KEY": "s" * 40}).env == "production"


def test_rate_limits_are_declared_only_where_the_limiter_looks():
    """The limiter skips requests outside RATE_LIMITED_BLUEPRINTS (common/extensions.py): a limit declared in
    another blueprint would never be enforced."""
    from common.extensions import RATE_LIMITED_BLUEPRINTS

    declaring = [path for path in (ROOT / "web").rglob("*.py") if "@limiter.limit" in path.read_text()]
    assert declaring
    for path in declaring:
        blueprint = re.search(r'Blueprint\("(\w+)"', path.read_text())
        assert blueprint and blueprint.group(1) in RATE_LIMITED_BLUEPRINTS, path
