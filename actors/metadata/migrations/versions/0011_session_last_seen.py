"""sessions.last_seen_at and released_at: the idle-session expiry

Open sessions start with last_seen_at = the upgrade's time: their clients have had no chance to
send a recorded heartbeat yet, so none is idle from before the upgrade.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from actors.metadata.tables import UtcDateTime, utc_now

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_sessions_open", ["finished_at", "last_seen_at"], unique=False)
        batch_op.create_index("ix_sessions_release", ["finish_reason", "released_at"], unique=False)
    sessions = sa.table("sessions", sa.column("finished_at", UtcDateTime()), sa.column("last_seen_at", UtcDateTime()))
    op.execute(sessions.update().where(sessions.c.finished_at.is_(None)).values(last_seen_at=utc_now()))


def downgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_release")
        batch_op.drop_index("ix_sessions_open")
        batch_op.drop_column("released_at")
        batch_op.drop_column("last_seen_at")
