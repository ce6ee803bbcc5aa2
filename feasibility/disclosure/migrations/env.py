"""Alembic environment for the disclosure registry and budget (:func:`core.db.run_environment`)."""

from __future__ import annotations

from alembic import context

from core.db import run_environment
from feasibility.disclosure.tables import metadata

run_environment(context, metadata)
