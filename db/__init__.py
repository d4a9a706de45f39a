"""Persistence: SQLAlchemy models, the engine and one repository module per resource."""
