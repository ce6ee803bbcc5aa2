"""Spec tests run on every feasibility engine through the ``engine`` fixture."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

#: (name, "module:class") of every engine; each must evaluate exactly like the reference.
ENGINES = [
    ("reference", "feasibility.engines.reference:ReferenceEngine"),
    ("polars", "feasibility.engines.polars_engine:PolarsEngine"),
    ("incremental", "feasibility.engines.incremental:IncrementalEngine"),
]


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)()


@pytest.fixture(params=[name for name, _ in ENGINES])
def engine(request: pytest.FixtureRequest) -> Any:
    return _load(dict(ENGINES)[request.param])
