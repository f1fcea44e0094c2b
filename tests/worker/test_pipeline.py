"""The worker's pipelined statements (worker/runtime.py: pipeline), in process against the test database."""
from __future__ import annotations

import time
from datetime import datetime

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import text

from worker import runtime

BACKEND = text("SELECT pg_backend_pid() AS pid")


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
def admin(database):
    engine = sa.create_engine(database, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def probe_table(admin):
    with admin.connect() as conn:
        conn.execute(text("CREATE TABLE pipeline_probe (n int)"))
    yield admin
    with admin.connect() as conn:
        conn.execute(text("DROP TABLE pipeline_probe"))


def _probe_rows(engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT n FROM pipeline_probe ORDER BY n")).scalars().all()


def test_each_statement_is_answered_in_order_with_typed_rows(worker_runtime):
    with worker_runtime.pipeline(text("SELECT CAST(:n AS int) AS n, now() AS at"), {"n": 41}) as sent:
        sent.send(text("SELECT CAST(:doc AS jsonb) AS doc, CAST(:none AS text) AS none"),
                  {"doc": '{"a": [1, 2]}', "none": None})
        first, second = sent.results()
    assert first[0]["n"] == 41 and isinstance(first[0]["at"], datetime)
    assert second == [{"doc": {"a": [1, 2]}, "none": None}]


def test_a_statement_commits_before_its_answer_is_read(worker_runtime, probe_table):
    """What a claim relies on: it is committed while the worker scores, before the worker reads the answer."""
    with worker_runtime.pipeline(text("INSERT INTO pipeline_probe VALUES (:n) RETURNING n"), {"n": 7}) as sent:
        deadline, seen = time.monotonic() + 10, []
        while not seen and time.monotonic() < deadline:
            seen = _probe_rows(probe_table)
        (inserted,) = sent.results()
    assert seen == [7] and inserted == [{"n": 7}]


def test_a_failed_statement_neither_stops_the_next_nor_hides_its_error(worker_runtime, probe_table):
    with worker_runtime.pipeline(text("SELECT 1 / CAST(:zero AS int)"), {"zero": 0}) as sent:
        sent.send(text("INSERT INTO pipeline_probe VALUES (:n)"), {"n": 8})
        failed, inserted = sent.results()
    assert isinstance(failed, psycopg.errors.DivisionByZero) and "division by zero" in str(failed)
    assert inserted == [] and _probe_rows(probe_table) == [8]


def test_a_statement_that_failed_to_prepare_is_prepared_again_on_a_fresh_connection(worker_runtime, admin):
    """A connection that answered an error is not pooled again: it may have lost a statement it holds prepared."""
    late = text("SELECT n FROM pipeline_late WHERE n = :n")
    with worker_runtime.pipeline(BACKEND, {}) as sent:
        sent.send(late, {"n": 1})
        (before,), missing = sent.results()
    assert isinstance(missing, psycopg.errors.UndefinedTable)
    with admin.connect() as conn:
        conn.execute(text("CREATE TABLE pipeline_late (n int)"))
        conn.execute(text("INSERT INTO pipeline_late VALUES (1)"))
    try:
        with worker_runtime.pipeline(BACKEND, {}) as sent:
            sent.send(late, {"n": 1})
            (after,), found = sent.results()
    finally:
        with admin.connect() as conn:
            conn.execute(text("DROP TABLE pipeline_late"))
    assert found == [{"n": 1}] and after["pid"] != before["pid"]


def test_answers_that_came_before_a_lost_connection_are_read(worker_runtime, admin):
    with worker_runtime.pipeline(BACKEND, {}) as sent:
        time.sleep(0.2)  # its answer arrives
        pid = sent.results()[0][0]["pid"]
        sent.send(text("SELECT CAST(:n AS int) AS n"), {"n": 1})
        time.sleep(0.2)
        with admin.connect() as conn:  # the server drops the connection before the worker reads it
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        time.sleep(0.2)
        sent.send(text("SELECT CAST(:n AS int) AS n"), {"n": 2})
        answered, lost = sent.results()
    assert answered == [{"n": 1}]
    assert isinstance(lost, psycopg.OperationalError) and sent.lost is lost
    with worker_runtime.pipeline(BACKEND, {}) as fresh:
        assert fresh.results()[0][0]["pid"] != pid


def _raise_unread(worker_runtime) -> None:
    with pytest.raises(RuntimeError, match="scoring failed"):
        with worker_runtime.pipeline(BACKEND, {}):
            raise RuntimeError("scoring failed")  # its answer left unread


def test_a_connection_whose_answers_went_unread_is_not_reused(worker_runtime):
    _raise_unread(worker_runtime)
    with worker_runtime.pipeline(BACKEND, {}) as sent:
        (first,) = sent.results()
    with worker_runtime.pipeline(BACKEND, {}) as sent:
        (again,) = sent.results()
    assert again == first  # a connection read to the end goes back to the pool, out of pipeline mode
    _raise_unread(worker_runtime)
    with worker_runtime.pipeline(BACKEND, {}) as sent:
        (fresh,) = sent.results()
    assert fresh != first


def test_a_statement_is_prepared_once_per_connection(worker_runtime):
    counted = text("SELECT CAST(:n AS int) AS n")
    for n in range(3):
        with worker_runtime.pipeline(counted, {"n": n}) as sent:
            assert sent.results() == [[{"n": n}]]
    listed = text("SELECT statement FROM pg_prepared_statements ORDER BY statement")
    with worker_runtime.pipeline(listed, {}) as sent:
        (prepared,) = sent.results()
    assert [row["statement"] for row in prepared] == ["SELECT CAST($1 AS int) AS n", str(listed)]
