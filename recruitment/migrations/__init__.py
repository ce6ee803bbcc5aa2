"""Alembic migrations of the recruitment database (run them with ``recruitment.db.upgrade``)."""
