"""Hypothesis profiles for the whole test suite.

``ci`` (the default) is deterministic, so a run is repeatable and never flaky; tests keep their
own small ``max_examples``. ``HYPOTHESIS_PROFILE=long`` runs randomised and much longer: property
tests that size themselves from the profile (see ``tests/generative``) run thousands of examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile(
    "long",
    derandomize=False,
    deadline=None,
    max_examples=5_000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
