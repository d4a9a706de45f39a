"""Tenant limits and quotas, and what the fair training scheduler orders by

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# NULL in each means "the LLMOS_DEFAULT_* setting", so changing a default reaches every tenant that kept it.
LIMITS = ('rpm', 'tpm', 'max_active_jobs', 'max_webhook_endpoints', 'max_active_batches')


def upgrade() -> None:
    for name in LIMITS:
        op.add_column('tenants', sa.Column(name, sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('max_storage_bytes', sa.BigInteger(), nullable=True))
    op.add_column('tenants', sa.Column('weight', sa.Float(), nullable=True))
    op.add_column('fine_tuning_jobs', sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE fine_tuning_jobs SET queued_at = updated_at WHERE status = 'queued'")
    # The scheduler's reads: a tenant's waiting jobs in its own order, and when it last had one started.
    op.create_index('ix_jobs_waiting', 'fine_tuning_jobs', ['tenant_id', 'priority', 'created_at'],
                    postgresql_where=sa.text("status = 'queued'"))
    op.create_index('ix_jobs_tenant_started', 'fine_tuning_jobs', ['tenant_id', 'started_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_started', table_name='fine_tuning_jobs')
    op.drop_index('ix_jobs_waiting', table_name='fine_tuning_jobs')
    op.drop_column('fine_tuning_jobs', 'queued_at')
    for name in (*LIMITS, 'max_storage_bytes', 'weight'):
        op.drop_column('tenants', name)
