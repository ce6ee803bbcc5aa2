"""Alembic environment for the recruitment database (:func:`core.db.run_environment`); without a
URL from the caller it uses ``CONCIERGE_RECRUITMENT_URL`` or the default SQLite file."""

from __future__ import annotations

import os

from alembic import context

from core.db import run_environment
from recruitment.models import Base

if context.config.get_main_option("sqlalchemy.url") or context.config.attributes.get("connection"):
    run_environment(context, Base.metadata)
else:
    from recruitment.db import default_url

    run_environment(
        context, Base.metadata, os.environ.get("CONCIERGE_RECRUITMENT_URL") or default_url()
    )
