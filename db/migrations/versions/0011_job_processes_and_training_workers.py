"""fine_tuning_jobs.processes (a job's `compute.processes`) and training_workers (what each training worker
offers, so the scheduler and the events know which jobs some worker can hold)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 23:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('fine_tuning_jobs', sa.Column('processes', sa.Integer(), server_default='1', nullable=False))
    op.create_table(
        'training_workers',
        sa.Column('name', sa.String(length=256), primary_key=True),
        sa.Column('processes', sa.Integer(), nullable=False),
        sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('training_workers')
    op.drop_column('fine_tuning_jobs', 'processes')
