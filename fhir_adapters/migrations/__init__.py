"""Alembic migrations of the identity vault and resource index (run by ``core.db``)."""
