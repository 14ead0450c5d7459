"""Celery workers: the app, thin tasks, the per-process model runtime and the shared memory."""
