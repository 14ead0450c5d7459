"""The smoothcert HTTP API (FastAPI). Never imports torch or the workers."""
