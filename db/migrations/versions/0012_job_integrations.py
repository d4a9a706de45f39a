"""fine_tuning_jobs.integrations: the experiment trackers a job reports to (MLflow), with their run ids

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 23:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('fine_tuning_jobs', sa.Column('integrations', postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column('fine_tuning_jobs', 'integrations')
