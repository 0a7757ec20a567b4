"""trajectory order (per-session seq and head) and keyed content digests

Revision ID: 0005_r14b
Revises: 0004_r14a
Create Date: 2026-12-01 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = "0005_r14b"
down_revision = "0004_r14a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trajectory_heads",
        sa.Column("session_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("next_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("session_id"),
    )
    with op.batch_alter_table("trajectory_heads", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_trajectory_heads_tenant_id"), ["tenant_id"], unique=False
        )
    # Existing records keep seq NULL (their order is not authenticated) and content_hmac ""
    # (they keep their plain content_sha256); see docs/encryption.md.
    with op.batch_alter_table("trajectory_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "content_hmac",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=False,
                server_default="",
            )
        )
        batch_op.create_unique_constraint("uq_trajectory_records_seq", ["session_id", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("trajectory_records", schema=None) as batch_op:
        batch_op.drop_constraint("uq_trajectory_records_seq", type_="unique")
        batch_op.drop_column("content_hmac")
        batch_op.drop_column("seq")
    with op.batch_alter_table("trajectory_heads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trajectory_heads_tenant_id"))
    op.drop_table("trajectory_heads")
