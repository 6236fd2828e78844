"""Policy leases: replicas of `reaper serve` on PostgreSQL share the policies between them.

``reaper_leases``: one row per scheduled policy, with the replica holding it and until when.
``reaper_replicas``: each live replica's heartbeat (how many replicas share the policies).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from reaper.db import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reaper_leases",
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("acquired_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("policy", name="pk_reaper_leases"),
    )
    op.create_table(
        "reaper_replicas",
        sa.Column("replica", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("replica", name="pk_reaper_replicas"),
    )


def downgrade() -> None:
    op.drop_table("reaper_replicas")
    op.drop_table("reaper_leases")
