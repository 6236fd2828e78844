"""Run ledger: one row per policy and scheduled slot, so a slot runs once across replicas.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from reaper.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reaper_ledger",
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("slot", UTCDateTime, nullable=False),
        sa.Column("claimed_at", UTCDateTime, nullable=False),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("policy", "slot", name="pk_reaper_ledger"),
    )


def downgrade() -> None:
    op.drop_table("reaper_ledger")
