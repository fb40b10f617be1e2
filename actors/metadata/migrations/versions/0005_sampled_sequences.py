"""sampled sequences recorded for stable_reinforce

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sampled_sequences",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=True),
        sa.Column("prompt", sa.LargeBinary(), nullable=False),
        sa.Column("tokens", sa.LargeBinary(), nullable=False),
        sa.Column("logprobs", sa.LargeBinary(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sampled_sequences", schema=None) as batch_op:
        batch_op.create_index("ix_sampled_sequences_used", ["last_used_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sampled_sequences", schema=None) as batch_op:
        batch_op.drop_index("ix_sampled_sequences_used")
    op.drop_table("sampled_sequences")
