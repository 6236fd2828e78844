"""Alembic environment: migrations run on the connection reaper hands over (see reaper.db)."""

from __future__ import annotations

from alembic import context

from reaper.audit import metadata
from reaper.inventory import inventory_table
from reaper.leases import leases_table, replicas_table

# reaper's database: the audit's tables, the inventory's and the leases', on one MetaData.
assert inventory_table.metadata is leases_table.metadata is replicas_table.metadata is metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - reaper always passes a connection
    raise RuntimeError("run migrations through `reaper db upgrade`")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
