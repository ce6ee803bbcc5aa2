"""Alembic migrations of the token revocation list (run by ``core.db``)."""
