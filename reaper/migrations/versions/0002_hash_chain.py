"""Tamper evidence: a hash chain per run over finalized audit rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reaper_audit") as batch:
        batch.add_column(sa.Column("chain_seq", sa.Integer, nullable=True))
        batch.add_column(sa.Column("row_hash", sa.String(64), nullable=True))
        batch.create_index("ix_reaper_audit_run_id_chain_seq", ["run_id", "chain_seq"])
    with op.batch_alter_table("reaper_runs") as batch:
        batch.add_column(sa.Column("chain_head", sa.String(64), nullable=True))
        batch.add_column(sa.Column("chain_length", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.drop_column("chain_length")
        batch.drop_column("chain_head")
    with op.batch_alter_table("reaper_audit") as batch:
        batch.drop_index("ix_reaper_audit_run_id_chain_seq")
        batch.drop_column("row_hash")
        batch.drop_column("chain_seq")
