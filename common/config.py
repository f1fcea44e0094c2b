"""Every InferQ setting, read from the environment when an app is built (never at import)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

DEV_SECRET = "dev-secret-change-me-0123456789abcdef"


class ConfigError(RuntimeError):
    """A setting is missing or invalid; the message says which and how to fix it."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def sqlalchemy_url(url: str) -> str:
    """Point plain postgres URLs at the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    secret_key: str = DEV_SECRET
    database_url: str = ""
    redis_url: str = ""
    storage_root: str = "var/storage"
    log_level: str = "INFO"
    # accounts
    access_token_minutes: int = 15
    refresh_token_days: int = 30
    login_rate_limit: str = "10 per minute"
    # request and upload limits
    max_json_bytes: int = 10 * 1024 * 1024
    max_model_bytes: int = 200 * 1024 * 1024
    max_batch_bytes: int = 5 * 1024 * 1024 * 1024
    # model sandbox
    sandbox_memory_mb: int = 2048
    sandbox_cpu_seconds: int = 60
    sandbox_wall_seconds: float = 90.0
    # prediction jobs
    max_instances_per_job: int = 1000
    max_wait_seconds: float = 30.0
    job_soft_time_limit: int = 60
    job_hard_time_limit: int = 90
    job_max_attempts: int = 3
    job_stuck_seconds: int = 120
    result_retention_days: int = 7
    reconcile_interval_seconds: float = 30.0
    # workers
    model_cache_size: int = 5
    model_cache_bytes: int = 1024 * 1024 * 1024
    adaptive_batch_max_jobs: int = 32
    # batches
    batch_rows_per_chunk: int = 50_000
    batch_task_time_limit: int = 1800
    # worker metrics exporter (0 disables) and the pool processes' metric files
    worker_metrics_port: int = 9808
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_dir: str = "var/metrics/worker"
    # only tests turn these on: slow or crashing models on demand
    fault_injection: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read every setting from `env` (default: os.environ); keyword overrides win."""
        env = os.environ if env is None else env
        settings = cls(
            env=env.get("INFERQ_ENV", "development"),
            secret_key=env.get("SECRET_KEY", DEV_SECRET),
            database_url=sqlalchemy_url(env.get("DATABASE_URL", "")),
            redis_url=env.get("REDIS_URL", ""),
            storage_root=env.get("STORAGE_ROOT", "var/storage"),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            access_token_minutes=_int(env, "ACCESS_TOKEN_MINUTES", 15),
            refresh_token_days=_int(env, "REFRESH_TOKEN_DAYS", 30),
            login_rate_limit=env.get("LOGIN_RATE_LIMIT", "10 per minute"),
            max_json_bytes=_int(env, "MAX_JSON_BYTES", cls.max_json_bytes),
            max_model_bytes=_int(env, "MAX_MODEL_BYTES", cls.max_model_bytes),
            max_batch_bytes=_int(env, "MAX_BATCH_BYTES", cls.max_batch_bytes),
            sandbox_memory_mb=_int(env, "SANDBOX_MEMORY_MB", 2048),
            sandbox_cpu_seconds=_int(env, "SANDBOX_CPU_SECONDS", 60),
            sandbox_wall_seconds=_float(env, "SANDBOX_WALL_SECONDS", 90.0),
            max_instances_per_job=_int(env, "MAX_INSTANCES_PER_JOB", 1000),
            max_wait_seconds=_float(env, "MAX_WAIT_SECONDS", 30.0),
            job_soft_time_limit=_int(env, "JOB_SOFT_TIME_LIMIT", 60),
            job_hard_time_limit=_int(env, "JOB_HARD_TIME_LIMIT", 90),
            job_max_attempts=_int(env, "JOB_MAX_ATTEMPTS", 3),
            job_stuck_seconds=_int(env, "JOB_STUCK_SECONDS", 120),
            result_retention_days=_int(env, "RESULT_RETENTION_DAYS", 7),
            reconcile_interval_seconds=_float(env, "RECONCILE_INTERVAL_SECONDS", 30.0),
            model_cache_size=_int(env, "MODEL_CACHE_SIZE", 5),
            model_cache_bytes=_int(env, "MODEL_CACHE_BYTES", cls.model_cache_bytes),
            adaptive_batch_max_jobs=_int(env, "ADAPTIVE_BATCH_MAX_JOBS", 32),
            batch_rows_per_chunk=_int(env, "BATCH_ROWS_PER_CHUNK", 50_000),
            batch_task_time_limit=_int(env, "BATCH_TASK_TIME_LIMIT", 1800),
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", 9808),
            worker_metrics_host=env.get("WORKER_METRICS_HOST", "127.0.0.1"),
            worker_metrics_dir=env.get("WORKER_METRICS_DIR", "var/metrics/worker"),
            fault_injection=_bool(env, "INFERQ_FAULT_INJECTION", False),
        )
        settings = replace(settings, **overrides)
        settings.check()
        return settings

    def check(self) -> None:
        """Fail at start, with a clear message, on settings that cannot work."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set (make run/make test start an embedded PostgreSQL)")
        if not self.redis_url:
            raise ConfigError("REDIS_URL is not set (make run/make test start an embedded Redis)")
        if self.env == "production" and (self.secret_key == DEV_SECRET or len(self.secret_key) < 32):
            raise ConfigError("SECRET_KEY must be set to a random string of at least 32 characters in production")
        if self.env == "production" and self.fault_injection:
            raise ConfigError("INFERQ_FAULT_INJECTION must not be enabled in production")
        if self.job_hard_time_limit <= self.job_soft_time_limit:
            raise ConfigError("JOB_HARD_TIME_LIMIT must be greater than JOB_SOFT_TIME_LIMIT")

    @property
    def broker_visibility_timeout(self) -> int:
        """Longer than the hard limit, so Redis never redelivers a message a live worker still holds."""
        return max(self.job_hard_time_limit, self.batch_task_time_limit) * 2 + 60
