"""sessions: project, display name, finish reason

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 11:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("display_name", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("finish_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("finish_detail", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("finish_detail")
        batch_op.drop_column("finish_reason")
        batch_op.drop_column("display_name")
        batch_op.drop_column("project_id")
