"""Alembic environment for the identity vault (:func:`core.db.run_environment`)."""

from __future__ import annotations

from alembic import context

from core.db import run_environment
from fhir_adapters.vault import metadata

run_environment(context, metadata)
