"""The worker's pipelined statements (worker/runtime.py: pipeline), in process against the test database."""
from __future__ import annotations

import time
from datetime import datetime

import psycopg
import pytest
import sqlalchemy as sa

from worker import runtime


@pytest.fixture
def worker_runtime(monkeypatch, test_env, database):
    for name, value in test_env.items():
        monkeypatch.setenv(name, value)
    runtime.settings.cache_clear()
    runtime.reset_after_fork()
    yield runtime
    runtime._autocommit_engine().dispose()
    runtime.reset_after_fork()
    runtime.settings.cache_clear()


@pytest.fixture
def probe_table(database):
    engine = sa.create_engine(database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE pipeline_probe (n int)"))
    yield engine
    with engine.connect() as conn:
        conn.execute(sa.text("DROP TABLE pipeline_probe"))
    engine.dispose()


def test_each_statement_is_answered_in_order_with_typed_rows(worker_runtime):
    with worker_runtime.pipeline("SELECT CAST($1 AS int) AS n, now() AS at", ["41"]) as sent:
        sent.send("SELECT CAST($1 AS jsonb) AS doc", ['{"a": [1, 2]}'])
        first, second = sent.results()
    assert first[0]["n"] == 41 and isinstance(first[0]["at"], datetime)
    assert second == [{"doc": {"a": [1, 2]}}]


def test_a_statement_commits_before_its_answer_is_read(worker_runtime, probe_table):
    """What a claim relies on: it is committed while the worker scores, before the worker reads the answer."""
    with worker_runtime.pipeline("INSERT INTO pipeline_probe VALUES (CAST($1 AS int)) RETURNING n", ["7"]) as sent:
        deadline, seen = time.monotonic() + 10, []
        while not seen and time.monotonic() < deadline:
            with probe_table.connect() as conn:
                seen = conn.execute(sa.text("SELECT n FROM pipeline_probe")).scalars().all()
        (inserted,) = sent.results()
    assert seen == [7] and inserted == [{"n": 7}]


def test_a_failed_statement_neither_stops_the_next_nor_hides_its_error(worker_runtime, probe_table):
    with worker_runtime.pipeline("SELECT 1 / CAST($1 AS int)", ["0"]) as sent:
        sent.send("INSERT INTO pipeline_probe VALUES (CAST($1 AS int))", ["8"])
        with pytest.raises(psycopg.DatabaseError, match="division by zero"):
            sent.results()
    with probe_table.connect() as conn:
        assert conn.execute(sa.text("SELECT n FROM pipeline_probe")).scalars().all() == [8]


def _raise_unread(worker_runtime) -> None:
    with pytest.raises(RuntimeError, match="scoring failed"):
        with worker_runtime.pipeline("SELECT pg_backend_pid() AS pid", []):
            raise RuntimeError("scoring failed")  # its answer left unread


def test_a_connection_whose_answers_went_unread_is_not_reused(worker_runtime):
    _raise_unread(worker_runtime)
    with worker_runtime.pipeline("SELECT pg_backend_pid() AS pid", []) as sent:
        (first,) = sent.results()
    with worker_runtime.pipeline("SELECT pg_backend_pid() AS pid", []) as sent:
        (again,) = sent.results()
    assert again == first  # a connection read to the end goes back to the pool, out of pipeline mode
    _raise_unread(worker_runtime)
    with worker_runtime.pipeline("SELECT pg_backend_pid() AS pid", []) as sent:
        (fresh,) = sent.results()
    assert fresh != first


def test_a_statement_is_prepared_once_per_connection(worker_runtime):
    counted = "SELECT CAST($1 AS int) AS n"
    for n in range(3):
        with worker_runtime.pipeline(counted, [str(n)]) as sent:
            assert sent.results() == [[{"n": n}]]
    listed = "SELECT statement FROM pg_prepared_statements ORDER BY statement"
    with worker_runtime.pipeline(listed, []) as sent:
        (prepared,) = sent.results()
    assert [row["statement"] for row in prepared] == sorted([counted, listed])
