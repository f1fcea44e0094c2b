"""Per-process worker state: settings, database engine, Redis, the model cache.

Everything here is created lazily in the process that uses it, so nothing crosses a fork.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import cache
from typing import Iterator, TypeVar

import psycopg
import redis
from psycopg import pq
from psycopg.adapt import Transformer
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, TextClause, create_engine
from sqlalchemy.dialects import postgresql
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


@cache
def _driver_sql(statement: TextClause) -> str:
    """A text() statement in psycopg's parameter style (:name becomes %(name)s)."""
    return str(statement.compile(dialect=_autocommit_engine().dialect))


def execute(statement: TextClause, params: dict | None = None) -> list[tuple]:
    """Run one statement (atomic on its own) and return its rows as named tuples, retrying while PostgreSQL
    is unreachable. The scoring path's few hand-written statements go to psycopg directly, on a connection
    of the pool: SQLAlchemy's execution layer cost as much CPU as PostgreSQL's round trip (0.25 ms each)."""
    sql = _driver_sql(statement)

    def run() -> list[tuple]:
        connection = _autocommit_engine().raw_connection()
        try:
            with connection.driver_connection.cursor(row_factory=namedtuple_row) as cursor:
                cursor.execute(sql, params or {})
                return cursor.fetchall() if cursor.description else []
        except psycopg.OperationalError:
            connection.invalidate()  # a dropped connection goes; the pool opens a fresh one for the retry
            raise
        finally:
            connection.close()

    return with_db_retry(run)


Answer = list[dict] | psycopg.Error  # a pipelined statement's rows, or why it has none


class Pipeline:
    """Statements on one connection in libpq's pipeline mode: each goes to PostgreSQL as soon as it is sent, without
    waiting for the answer to the one before, and commits on its own (a sync after each: a statement's
    `set_config(..., true)` stays its own); the sender reads every answer at the end. Each statement is prepared
    once per connection (`prepared`, the names it holds): planning one of the scoring path's UPDATEs costs
    PostgreSQL more than running it."""

    def __init__(self, connection: psycopg.Connection, prepared: set[bytes]):
        self._pgconn, self._prepared = connection.pgconn, prepared
        self._encoding = connection.info.encoding
        self._rows = Transformer(connection)
        # per statement, how many commands answer before its sync, or the loss that kept it from being sent
        self._pending: list[int | psycopg.OperationalError] = []
        self.lost: psycopg.OperationalError | None = None
        self._read_lost = False
        self.failed = False  # an answer was an error (a loss included): the connection is not pooled again

    def send(self, statement: TextClause, params: dict) -> None:
        """Send a statement; a connection lost meanwhile is its answer (results)."""
        name, sql, names = _numbered(statement)
        values = [None if (v := params[n]) is None else str(v).encode() for n in names]
        commands: int | psycopg.OperationalError = 1 if name in self._prepared else 2
        try:
            if commands == 2:
                self._pgconn.send_prepare(name, sql)
                self._prepared.add(name)  # were the PREPARE to fail, the connection is discarded with this set
            self._pgconn.send_query_prepared(name, values)
            self._pgconn.pipeline_sync()  # ends its implicit transaction, so it commits, and flushes it
        except psycopg.OperationalError as exc:
            self.lost = self.lost or exc
            commands = self.lost
        self._pending.append(commands)

    def results(self) -> list[Answer]:
        """Each statement's rows, or its failure, in the order sent. Answers that arrived before the connection
        was lost are read; every later one is that loss (`lost`)."""
        answers = [pending if isinstance(pending, Exception) else self._read_one(pending)
                   for pending in self._pending]
        self._pending = []
        self.failed = self.failed or any(isinstance(answer, Exception) for answer in answers)
        return answers

    def _read_one(self, commands: int) -> Answer:
        if self._read_lost:
            return self.lost
        answer: Answer = []
        for _ in range(commands):
            while (result := self._pgconn.get_result()) is not None:
                if result.status == pq.ExecStatus.TUPLES_OK:
                    self._rows.set_pgresult(result)
                    names = [result.fname(i).decode() for i in range(result.nfields)]
                    answer = [dict(zip(names, row)) for row in self._rows.load_rows(0, result.ntuples, tuple)]
                elif result.status != pq.ExecStatus.COMMAND_OK and not isinstance(answer, Exception):
                    answer = psycopg.errors.error_from_result(result, encoding=self._encoding)
        sync = self._pgconn.get_result()
        if sync is None or sync.status != pq.ExecStatus.PIPELINE_SYNC:
            self._read_lost = True
            self.lost = self.lost or psycopg.OperationalError(
                self._pgconn.error_message.decode(errors="replace").strip() or "the connection was lost")
            return self.lost
        return answer


@cache
def _numbered(statement: TextClause) -> tuple[bytes, bytes, tuple[str, ...]]:
    """A text() statement in libpq's terms: the name it is prepared under, its SQL with $1... parameters, and
    the parameters' names in that order."""
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="numeric_dollar"))
    name = f"inferq_{hashlib.sha1(compiled.string.encode()).hexdigest()[:16]}"
    return name.encode(), compiled.string.encode(), tuple(compiled.positiontup)


@contextmanager
def pipeline(statement: TextClause, params: dict) -> Iterator[Pipeline]:
    """Send a statement on a pooled connection and run the block while PostgreSQL executes and commits it; the
    block may send more behind it, and must read the answers (Pipeline.results: it is an error to leave them
    unread). A connection that failed (a lost connection, any error answer: a statement it holds prepared may be
    gone) or whose answers went unread (the block raised) is discarded rather than pooled."""
    connection = _autocommit_engine().raw_connection()
    try:
        connection.driver_connection.pgconn.enter_pipeline_mode()
        sent = Pipeline(connection.driver_connection, connection.info.setdefault("prepared", set()))
        sent.send(statement, params)
        yield sent
        if sent.failed:
            connection.invalidate()
        else:
            connection.driver_connection.pgconn.exit_pipeline_mode()  # fails while answers are unread
    except BaseException:
        connection.invalidate()
        raise
    finally:
        connection.close()


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
        except (DBAPIError, psycopg.OperationalError) as exc:
            if not _is_connection_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _is_connection_error(exc: DBAPIError | psycopg.OperationalError) -> bool:
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc.orig, psycopg.OperationalError)
    return True
