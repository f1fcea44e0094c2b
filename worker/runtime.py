"""Per-process worker state: settings, database engine, Redis, the model cache.

Everything here is created lazily in the process that uses it, so nothing crosses a fork.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import cache
from typing import Iterator, TypeVar

import redis
from sqlalchemy import Engine, Executable, Row, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from common.config import Settings
from common.storage import ArtifactStore
from worker.model_cache import ModelCache

T = TypeVar("T")


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def engine() -> Engine:
    return create_engine(settings().database_url, pool_pre_ping=True, pool_size=2, max_overflow=2)


@cache
def _autocommit_engine() -> Engine:
    """For the scoring path's single statements: each is one round trip, with no BEGIN, COMMIT or ping.
    A connection PostgreSQL dropped fails its statement, and `execute` runs it again on a fresh one."""
    return create_engine(settings().database_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=2)


@cache
def _sessions() -> sessionmaker[Session]:
    return sessionmaker(engine(), expire_on_commit=False)


@contextmanager
def session() -> Iterator[Session]:
    """A session that is closed when the block ends, so no task leaves one behind."""
    with _sessions()() as s:
        yield s


def execute(statement: Executable, params: dict | None = None) -> list[Row]:
    """Run one statement (atomic on its own) and return its rows, retrying while PostgreSQL is unreachable."""
    def run() -> list[Row]:
        with _autocommit_engine().connect() as connection:
            return connection.execute(statement, params or {}).all()

    return with_db_retry(run)


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings().redis_url, socket_timeout=5, socket_connect_timeout=2)


@cache
def model_cache() -> ModelCache:
    return ModelCache(settings().model_cache_size, settings().model_cache_bytes)


@cache
def artifact_store() -> ArtifactStore:
    return ArtifactStore(settings().storage_root)


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def reset_after_fork() -> None:
    """Forget every connection and cache inherited from the parent process."""
    for factory in (engine, _autocommit_engine, _sessions, redis_client, model_cache):
        factory.cache_clear()


def with_db_retry(operation: Callable[[], T], *, seconds: float = 60.0) -> T:
    """Run a database operation, retrying while PostgreSQL is briefly unreachable."""
    deadline, delay = time.monotonic() + seconds, 0.2
    while True:
        try:
            return operation()
        except DBAPIError as exc:
            if not exc.connection_invalidated and not _is_connection_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _is_connection_error(exc: DBAPIError) -> bool:
    import psycopg

    return isinstance(exc.orig, psycopg.OperationalError)
