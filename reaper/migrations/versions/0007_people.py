"""People in the loop: pins (legal holds), approvals and snapshots on audit rows.

``reaper_pins``: one row per pin of a task, for a policy or for every policy on a kind of target;
an unpin fills in ``unpinned_at``. Each pin and unpin is also a run of its own in the audit.
``reaper_runs.approval_id`` and ``reaper_audit.approval_id``: the approval a run (and each of its
rows) carries out. ``reaper_audit.snapshot``: the task's record as listed, on deletion rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from reaper.db import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.add_column(sa.Column("approval_id", sa.String(36), nullable=True))
    with op.batch_alter_table("reaper_audit") as batch:
        batch.add_column(sa.Column("approval_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("snapshot", sa.Text, nullable=True))
    op.create_table(
        "reaper_pins",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("pinned_by", sa.String(128), nullable=False),
        sa.Column("pinned_at", UTCDateTime, nullable=False),
        sa.Column("until", UTCDateTime, nullable=True),
        sa.Column("pin_run_id", sa.String(36), nullable=False),
        sa.Column("unpinned_at", UTCDateTime, nullable=True),
        sa.Column("unpinned_by", sa.String(128), nullable=True),
        sa.Column("unpin_run_id", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_pins"),
    )
    op.create_index(
        "ix_reaper_pins_scope_name_unpinned_at", "reaper_pins", ["scope", "name", "unpinned_at"]
    )
    op.create_index("ix_reaper_pins_task_id", "reaper_pins", ["task_id"])


def downgrade() -> None:
    op.drop_index("ix_reaper_pins_task_id", table_name="reaper_pins")
    op.drop_index("ix_reaper_pins_scope_name_unpinned_at", table_name="reaper_pins")
    op.drop_table("reaper_pins")
    with op.batch_alter_table("reaper_audit") as batch:
        batch.drop_column("snapshot")
        batch.drop_column("approval_id")
    with op.batch_alter_table("reaper_runs") as batch:
        batch.drop_column("approval_id")
