"""Audit rows: drop two indexes no query needs, so each intent and outcome writes less.

``(run_id, seq)`` served no query (rows are read by id, task, time or policy); ``(run_id,
chain_seq)`` was changed by every outcome update and served only ``reaper audit verify``, which
reads a run's rows through ``(run_id, task_id)`` and sorts them. Without it an outcome update
touches no indexed column, so PostgreSQL can update the row in place (HOT).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_reaper_audit_run_id_seq", table_name="reaper_audit")
    op.drop_index("ix_reaper_audit_run_id_chain_seq", table_name="reaper_audit")


def downgrade() -> None:
    op.create_index("ix_reaper_audit_run_id_chain_seq", "reaper_audit", ["run_id", "chain_seq"])
    op.create_index("ix_reaper_audit_run_id_seq", "reaper_audit", ["run_id", "seq"])
