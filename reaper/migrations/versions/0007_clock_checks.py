"""Runs: what the run's ages were based on.

``future_timestamps``: listed tasks the plan protected because their age field lay in the future
(a zone or clock is wrong). ``clock_skew_seconds``: the target's clock minus ours, from the HTTP
``Date`` of its answers (median; NULL when no answer had one).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.add_column(
            sa.Column("future_timestamps", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("clock_skew_seconds", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.drop_column("clock_skew_seconds")
        batch.drop_column("future_timestamps")
