"""Alembic environment for the audit log (:func:`core.db.run_environment`)."""

from __future__ import annotations

from alembic import context

from core.audit import metadata
from core.db import run_environment

run_environment(context, metadata)
