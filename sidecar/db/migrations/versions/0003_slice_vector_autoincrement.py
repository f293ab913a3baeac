"""slice_vector keys never reused (SQLite AUTOINCREMENT)

Slice vector keys are the labels of the hnswlib index. Without AUTOINCREMENT,
SQLite may give a deleted row's key to a new row; an index saved before the
deletion would then hold the old vector under the new row's label.
PostgreSQL sequences never reuse values, so only SQLite needs the rebuild.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "slice_vector", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "slice_vector", recreate="always", table_kwargs={"sqlite_autoincrement": False}
    ):
        pass
