"""Alembic environment for the follow-up tables (:func:`core.db.run_environment`)."""

from __future__ import annotations

from alembic import context

from core.db import run_environment
from followup.tables import Base

run_environment(context, Base.metadata)
