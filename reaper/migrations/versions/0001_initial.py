"""Runs and audit rows.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from reaper.db import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "reaper_runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("policy_hash", sa.String(64), nullable=False),
        sa.Column("policy_json", sa.Text, nullable=False),
        sa.Column("target_kind", sa.String(32), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        *(
            sa.Column(name, sa.BigInteger, nullable=False)
            for name in (
                "listed",
                "eligible",
                "kept",
                "deleted",
                "already_gone",
                "failed",
                "unknown",
                "skipped",
                "reclaimed_bytes",
            )
        ),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_runs"),
    )
    op.create_index("ix_reaper_runs_policy_started_at", "reaper_runs", ["policy", "started_at"])
    op.create_index("ix_reaper_runs_started_at", "reaper_runs", ["started_at"])

    op.create_table(
        "reaper_audit",
        sa.Column("id", _Id, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("task_status", sa.String(64), nullable=True),
        sa.Column("task_timestamp", UTCDateTime, nullable=True),
        sa.Column("task_age_seconds", sa.BigInteger, nullable=True),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("error_code", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("reclaimed_bytes", sa.BigInteger, nullable=True),
        sa.Column("files_count", sa.Integer, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
        sa.Column("decided_at", UTCDateTime, nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reaper_runs.id"], name="fk_reaper_audit_run_id_reaper_runs"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_audit"),
        sa.UniqueConstraint("run_id", "task_id", name="uq_reaper_audit_run_id_task_id"),
    )
    op.create_index("ix_reaper_audit_task_id", "reaper_audit", ["task_id"])
    op.create_index("ix_reaper_audit_recorded_at", "reaper_audit", ["recorded_at"])
    op.create_index("ix_reaper_audit_policy_recorded_at", "reaper_audit", ["policy", "recorded_at"])
    op.create_index("ix_reaper_audit_run_id_seq", "reaper_audit", ["run_id", "seq"])


def downgrade() -> None:
    op.drop_table("reaper_audit")
    op.drop_table("reaper_runs")
