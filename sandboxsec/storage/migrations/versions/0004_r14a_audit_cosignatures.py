"""audit: witness cosignatures beside the checkpoints they cosign

Revision ID: 0004_r14a
Revises: 0003_r12
Create Date: 2026-12-01 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel

import sandboxsec.storage.types
from alembic import op


revision = '0004_r14a'
down_revision = '0003_r12'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_cosignatures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('witness', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('line', sa.Text(), nullable=False),
    sa.Column('created_at', sandboxsec.storage.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'size', 'witness', name='uq_audit_cosignatures_log_size_w')
    )
    with op.batch_alter_table('audit_cosignatures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_cosignatures_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_cosignatures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_cosignatures_tenant_id'))

    op.drop_table('audit_cosignatures')
