"""Alembic environment: runs revisions on the connection dsf-bridge hands over, or on a URL.

``dsf-bridge db upgrade`` passes an open connection in ``config.attributes["connection"]``;
plain ``alembic`` (developers making a new revision) reads ``sqlalchemy.url`` from alembic.ini
or ``DSF_BRIDGE_DB__URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Connection

from dsf_bridge.store.database import create_sync_engine
from dsf_bridge.store.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("DSF_BRIDGE_DB__URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set DSF_BRIDGE_DB__URL or sqlalchemy.url in alembic.ini")
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


main()
