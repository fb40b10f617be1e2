"""sample completions for retrieve_futures, and join_sampling_session counters

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 15:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sampling_target", sa.String(length=160), nullable=True))
        batch_op.add_column(sa.Column("completion_seq", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_requests_completions", ["sampling_target", "completion_seq"], unique=False)
    with op.batch_alter_table("samplers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clones", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=192), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("counters")
    with op.batch_alter_table("samplers", schema=None) as batch_op:
        batch_op.drop_column("clones")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_completions")
        batch_op.drop_column("completion_seq")
        batch_op.drop_column("sampling_target")
