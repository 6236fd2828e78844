"""Runs: tasks dropped at send time, acknowledged deletions a later listing contradicted, and how
far the policy's acknowledged deletions have been checked against a listing.

``skipped_changed``: ids the send-time re-check dropped (seen live, or no longer eligible).
``acknowledged_not_deleted``: earlier deletions the target acknowledged but a listing of this run
still showed present (each has a correction row). ``verified_through``: the highest audit row id
of the policy's ``deleted`` rows that this run's listing checked; the next run checks later ones.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.add_column(
            sa.Column("skipped_changed", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("acknowledged_not_deleted", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("verified_through", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.drop_column("verified_through")
        batch.drop_column("acknowledged_not_deleted")
        batch.drop_column("skipped_changed")
