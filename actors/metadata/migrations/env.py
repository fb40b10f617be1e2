"""Alembic's environment for the metadata database: migrations run on the connection that
`actors.metadata.database.Database.migrate` hands over (no alembic.ini, no URL here)."""

from alembic import context

from actors.metadata.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
