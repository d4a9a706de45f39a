"""batches.validation_attempts: validation that keeps dying stops being retried

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('batches', sa.Column('validation_attempts', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('batches', 'validation_attempts')
