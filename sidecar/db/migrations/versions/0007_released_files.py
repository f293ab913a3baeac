"""instance.released_at: the file was released (storage.keep_files); row and vectors kept

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("released_at", sa.DateTime(), nullable=True))
        batch.create_index("ix_instance_released_at", ["released_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.drop_index("ix_instance_released_at")
        batch.drop_column("released_at")
