"""fine_tuning_jobs.validation_attempts: validation that keeps dying stops being retried

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('fine_tuning_jobs', sa.Column('validation_attempts', sa.Integer(), server_default='0',
                                                nullable=False))


def downgrade() -> None:
    op.drop_column('fine_tuning_jobs', 'validation_attempts')
