"""TPM reset/restart counters as unsigned 32-bit values (BIGINT with a range check)

TPMS_CLOCK_INFO's resetCount and restartCount are UINT32.  A 32-bit signed column refused
values from 2^31 on PostgreSQL (and SQLite stored them), so the two databases disagreed on
the same quote.

Revision ID: 0003_r12
Revises: 0002_r11
Create Date: 2026-12-01 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op


revision = '0003_r12'
down_revision = '0002_r11'
branch_labels = None
depends_on = None

_U32 = '{col} IS NULL OR ({col} >= 0 AND {col} <= 4294967295)'


def upgrade() -> None:
    with op.batch_alter_table('attestation_bound_aks', schema=None) as batch_op:
        batch_op.alter_column('last_reset_count', existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True)
        batch_op.alter_column('last_restart_count', existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True)
        batch_op.create_check_constraint('ck_bound_ak_reset_count_u32', _U32.format(col='last_reset_count'))
        batch_op.create_check_constraint('ck_bound_ak_restart_count_u32', _U32.format(col='last_restart_count'))


def downgrade() -> None:
    with op.batch_alter_table('attestation_bound_aks', schema=None) as batch_op:
        batch_op.drop_constraint('ck_bound_ak_restart_count_u32', type_='check')
        batch_op.drop_constraint('ck_bound_ak_reset_count_u32', type_='check')
        batch_op.alter_column('last_restart_count', existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True)
        batch_op.alter_column('last_reset_count', existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True)
