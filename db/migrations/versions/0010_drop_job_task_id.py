"""fine_tuning_jobs.task_id goes: training tickets name no job, so a job has no task id to re-send under

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_column('fine_tuning_jobs', 'task_id')


def downgrade() -> None:
    op.add_column('fine_tuning_jobs', sa.Column('task_id', sa.String(length=64), nullable=True))
