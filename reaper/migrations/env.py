"""Alembic environment: migrations run on the connection reaper hands over (see reaper.db)."""

from __future__ import annotations

from alembic import context

from reaper.audit import metadata
from reaper.holds import held_items_table, held_table
from reaper.inventory import inventory_table
from reaper.leases import leases_table, replicas_table
from reaper.notices import notices_table
from reaper.notify import deliveries_table
from reaper.pins import pins_table

# reaper's database: the audit's tables and those of the inventory, leases, pins, held plans,
# notices and notification deliveries, on one MetaData.
_TABLES = (
    inventory_table,
    leases_table,
    replicas_table,
    pins_table,
    held_table,
    held_items_table,
    notices_table,
    deliveries_table,
)
assert all(table.metadata is metadata for table in _TABLES)

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - reaper always passes a connection
    raise RuntimeError("run migrations through `reaper db upgrade`")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
