"""Alembic environment for the token revocation list (:func:`core.db.run_environment`)."""

from __future__ import annotations

from alembic import context

from core.db import run_environment
from core.revocation import metadata

run_environment(context, metadata)
