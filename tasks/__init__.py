"""Celery workers: training (queue gpu), online inference (queue inference), validation and upkeep (cpu)."""
