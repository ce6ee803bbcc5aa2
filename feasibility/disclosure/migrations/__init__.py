"""Alembic migrations of the disclosure registry and query budget (run by ``core.db``)."""
