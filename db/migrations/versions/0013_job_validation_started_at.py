"""fine_tuning_jobs.validation_started_at: validation takes the tenant validated least recently first

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 02:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('fine_tuning_jobs', sa.Column('validation_started_at', sa.DateTime(), nullable=True))
    op.create_index('ix_jobs_tenant_validation', 'fine_tuning_jobs', ['tenant_id', 'validation_started_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_validation', table_name='fine_tuning_jobs')
    op.drop_column('fine_tuning_jobs', 'validation_started_at')
