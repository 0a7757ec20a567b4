"""sessions bound to a TPM-held key: key thumbprint, ended_by, used proofs

Revision ID: 0002_r11
Revises: 0001
Create Date: 2026-12-01 08:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel

import sandboxsec.storage.types
from alembic import op


revision = '0002_r11'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('agent_sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_thumbprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('ended_by', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))

    op.create_table('session_proofs',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('expires_at', sandboxsec.storage.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('session_proofs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_session_proofs_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_session_proofs_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('session_proofs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_session_proofs_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_session_proofs_expires_at'))
    op.drop_table('session_proofs')
    with op.batch_alter_table('agent_sessions', schema=None) as batch_op:
        batch_op.drop_column('ended_by')
        batch_op.drop_column('key_thumbprint')
