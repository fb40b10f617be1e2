"""snapshot samplers name their training model

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 11:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samplers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_model_id", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samplers", schema=None) as batch_op:
        batch_op.drop_column("source_model_id")
