"""the service's own keys, held once for every node (service_keys)

Revision ID: 0006_id15
Revises: 0006_p13
Create Date: 2026-12-01 11:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel

import sandboxsec.storage.types
from alembic import op

revision = "0006_id15"
down_revision = "0006_p13"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Empty on upgrade: a node's key files are imported on its first start (or by
    # `sandboxsec keys migrate`), see docs/operations.md "Key distribution".
    op.create_table(
        "service_keys",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("provider_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("origin", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("created_at", sandboxsec.storage.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
    )


def downgrade() -> None:
    op.drop_table("service_keys")
