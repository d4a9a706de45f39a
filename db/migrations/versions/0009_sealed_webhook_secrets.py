"""Webhook signing secrets are stored sealed: their columns hold the longer sealed form

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

COLUMNS = (('webhook_endpoints', 'secret', False), ('webhook_endpoints', 'previous_secret', True),
           ('tenant_webhook_secrets', 'secret', False))


def upgrade() -> None:
    # Existing secrets stay readable as they are; `llmos secrets rotate` seals them.
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.Text(), existing_type=sa.String(128), existing_nullable=nullable)


def downgrade() -> None:
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.String(128), existing_type=sa.Text(), existing_nullable=nullable)
