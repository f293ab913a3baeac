"""rejected_instance: instances rejected by IOCM rejection notes (never stored again)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("note_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("rejected_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("rejected_instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rejected_instance_study_instance_uid"),
                              ["study_instance_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rejected_instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rejected_instance_study_instance_uid"))
    op.drop_table("rejected_instance")
