"""Shared machinery: the Celery app, settings, locks, the per-process runtime, the CLI."""
