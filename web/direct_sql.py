"""One-statement queries on the web's hot path (the job insert, the revocation check), in psycopg's own terms.

SQLAlchemy's execution layer cost as much CPU as the round trip, and its pool's pre-ping is a round trip of its
own; these statements run on a pool of their own instead (the DIRECT_SQL bind: autocommit, no pre-ping). A pooled
connection PostgreSQL dropped fails its statement, which then runs once more on a fresh connection, the pool's
others having been dropped too (a restarted PostgreSQL drops them all).
"""
from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import Engine

from common.extensions import DIRECT_SQL, db


def fetch_one(statement: str, values: dict[str, Any]) -> tuple | None:
    """The statement's first row (None if it returned none), committed on return."""
    engine = db.engines[DIRECT_SQL]
    try:
        return _fetch_one(engine, statement, values)
    except psycopg.OperationalError:
        engine.dispose()
        return _fetch_one(engine, statement, values)


def _fetch_one(engine: Engine, statement: str, values: dict[str, Any]) -> tuple | None:
    connection = engine.raw_connection()
    try:
        return connection.driver_connection.execute(statement, values).fetchone()
    except psycopg.OperationalError:
        connection.invalidate()
        raise
    finally:
        connection.close()
