"""People in the loop: pins (legal holds), approvals and snapshots on audit rows.

``reaper_pins``: one row per pin of a task, for a policy or for every policy on a kind of target;
an unpin fills in ``unpinned_at``. Each pin and unpin is also a run of its own in the audit.
``reaper_runs.approval_id`` and ``reaper_audit.approval_id``: the approval a run (and each of its
rows) carries out. ``reaper_audit.snapshot``: the task's record as listed, on deletion rows.
``reaper_held`` and ``reaper_held_items``: the plans guards refused, kept for approval, and what
people decided about them. ``reaper_notices``: when each task of a policy with ``delete.notice``
was first found eligible. ``reaper_deliveries``: each notification sent, and how it went.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from reaper.db import UTCDateTime

revision = "0009"
down_revision = "0008"
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
    op.create_table(
        "reaper_held",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("policy_hash", sa.String(64), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("guard", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("eligible", sa.BigInteger, nullable=False),
        sa.Column("listed", sa.BigInteger, nullable=False),
        sa.Column("held_at", UTCDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("approval_id", sa.String(36), nullable=True),
        sa.Column("approved_by", sa.String(128), nullable=True),
        sa.Column("approved_at", UTCDateTime, nullable=True),
        sa.Column("valid_until", UTCDateTime, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("applied_run_id", sa.String(36), nullable=True),
        sa.Column("closed_at", UTCDateTime, nullable=True),
        sa.Column("closed_by", sa.String(128), nullable=True),
        sa.Column("close_note", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("run_id", name="pk_reaper_held"),
    )
    op.create_index("ix_reaper_held_policy_status", "reaper_held", ["policy", "status"])
    op.create_table(
        "reaper_held_items",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("task_status", sa.String(64), nullable=True),
        sa.Column("task_timestamp", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("run_id", "task_id", name="pk_reaper_held_items"),
    )
    op.create_table(
        "reaper_notices",
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("first_seen", UTCDateTime, nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint("policy", "task_id", name="pk_reaper_notices"),
    )
    op.create_table(
        "reaper_deliveries",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("sink", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_deliveries"),
    )
    op.create_index(
        "ix_reaper_deliveries_policy_created_at", "reaper_deliveries", ["policy", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_reaper_deliveries_policy_created_at", table_name="reaper_deliveries")
    op.drop_table("reaper_deliveries")
    op.drop_table("reaper_notices")
    op.drop_table("reaper_held_items")
    op.drop_index("ix_reaper_held_policy_status", table_name="reaper_held")
    op.drop_table("reaper_held")
    op.drop_index("ix_reaper_pins_task_id", table_name="reaper_pins")
    op.drop_index("ix_reaper_pins_scope_name_unpinned_at", table_name="reaper_pins")
    op.drop_table("reaper_pins")
    with op.batch_alter_table("reaper_audit") as batch:
        batch.drop_column("snapshot")
        batch.drop_column("approval_id")
    with op.batch_alter_table("reaper_runs") as batch:
        batch.drop_column("approval_id")
