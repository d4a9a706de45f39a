"""batches and their chunks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:00:00.000000
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        'batches',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('input_file_id', sa.String(length=64), nullable=False),
        sa.Column('completion_window', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('stop_reason', sa.String(length=16), nullable=True),
        sa.Column('errors', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('output_file_id', sa.String(length=64), nullable=True),
        sa.Column('error_file_id', sa.String(length=64), nullable=True),
        sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('webhook_url', sa.Text(), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('chunk_count', sa.Integer(), nullable=False),
        sa.Column('task_id', sa.String(length=64), nullable=True),
        _ts('heartbeat_at'),
        _ts('created_at', nullable=False),
        _ts('updated_at', nullable=False),
        _ts('in_progress_at'),
        _ts('expires_at'),
        _ts('finalizing_at'),
        _ts('completed_at'),
        _ts('failed_at'),
        _ts('expired_at'),
        _ts('cancelling_at'),
        _ts('cancelled_at'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_batches_tenant_created', 'batches', ['tenant_id', 'created_at'], unique=False)
    op.create_index('ix_batches_status', 'batches', ['status'], unique=False)
    op.create_table(
        'batch_chunks',
        sa.Column('batch_id', sa.String(length=64), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('line_count', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('task_id', sa.String(length=64), nullable=False),
        sa.Column('worker', sa.String(length=256), nullable=True),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('output_path', sa.Text(), nullable=True),
        sa.Column('error_path', sa.Text(), nullable=True),
        _ts('started_at'),
        _ts('finished_at'),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'seq'),
    )


def downgrade() -> None:
    op.drop_table('batch_chunks')
    op.drop_index('ix_batches_status', table_name='batches')
    op.drop_index('ix_batches_tenant_created', table_name='batches')
    op.drop_table('batches')
