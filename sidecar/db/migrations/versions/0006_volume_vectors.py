"""volume_vector: series embedded as volumes (one vector per series and model)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volume_vector",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("slices", sa.Integer(), nullable=False),
        sa.Column("spacing_mm", sa.Float(), nullable=True),
        sa.Column("vector", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["series_pk"], ["series.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_pk"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_pk", "model_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_volume_vector_model_study", "volume_vector",
                    ["model_id", "study_pk"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_volume_vector_model_study", table_name="volume_vector")
    op.drop_table("volume_vector")
