"""Alembic migrations of the audit log (run by ``core.db``)."""
