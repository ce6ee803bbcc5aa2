"""Alembic environment for the terminology store (:func:`core.db.run_environment`)."""

from __future__ import annotations

from alembic import context

from core.db import run_environment
from terminology.tables import metadata

run_environment(context, metadata)
