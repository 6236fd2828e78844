"""Aparavi inventory: the (token, type) pairs reaper tracks for an API without a list endpoint.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from reaper.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "reaper_aparavi_inventory",
        sa.Column("id", _Id, nullable=False, autoincrement=True),
        sa.Column("base_url", sa.String(512), nullable=False),
        sa.Column("token", sa.String(200), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("registered_at", UTCDateTime, nullable=False),
        sa.Column("retired_at", UTCDateTime, nullable=True),
        sa.Column("retired_reason", sa.Text, nullable=True),
        sa.Column("last_status", sa.String(64), nullable=True),
        sa.Column("last_checked_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_aparavi_inventory"),
        sa.UniqueConstraint(
            "base_url", "token", "type", name="uq_reaper_aparavi_inventory_base_url_token_type"
        ),
        sa.CheckConstraint("type IN ('cpu', 'gpu')", name="ck_reaper_aparavi_inventory_type"),
    )
    op.create_index(
        "ix_reaper_aparavi_inventory_base_url_retired_at",
        "reaper_aparavi_inventory",
        ["base_url", "retired_at"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_reaper_aparavi_inventory_base_url_retired_at", table_name="reaper_aparavi_inventory"
    )
    op.drop_table("reaper_aparavi_inventory")
