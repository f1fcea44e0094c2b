"""The migrations, which build every test database, build the schema the models declare."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from common.config import sqlalchemy_url
from common.models import Base


def test_the_migrated_database_has_the_tables_columns_and_indexes_the_models_declare(database):
    engine = sa.create_engine(sqlalchemy_url(database))
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []
