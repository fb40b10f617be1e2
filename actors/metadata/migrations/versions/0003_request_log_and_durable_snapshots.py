"""request log and durable snapshots

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 06:47:55.320068
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("seq_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("verb", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("payload", sa.LargeBinary(), nullable=True))
        batch_op.create_index(batch_op.f("ix_requests_model_id"), ["model_id"], unique=False)

    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("durable_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("durable_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("durable_at")
        batch_op.drop_column("durable_seq")

    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_requests_model_id"))
        batch_op.drop_column("payload")
        batch_op.drop_column("verb")
        batch_op.drop_column("seq_id")
        batch_op.drop_column("model_id")
