"""Integration tests share one real broker per session; each test gets topics of its own.

The broker must be there (scripts/test.sh starts it): a missing broker fails the run, it never
skips a test.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from infra.broker import answers
from infra.topics_admin import ensure_topics

if TYPE_CHECKING:
    from .surveillance_stack import RegulatorStack


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if answers(bootstrap):
            return bootstrap
        time.sleep(1)
    pytest.fail(
        f"no Kafka broker answers at {bootstrap}: start it with `concierge broker start` "
        "(scripts/test.sh does)"
    )


@pytest.fixture
def topic_prefix(kafka_bootstrap: str, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9-]", "-", request.node.name)[:40]
    prefix = f"t-{name}-{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix)
    return prefix


@pytest.fixture
def regulator_stack(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[RegulatorStack]:
    """A real worker and ``concierge api`` (subprocess) over a population with a faulty hip
    model; ready once the faulty model signals (see ``surveillance_stack.py``)."""
    from core.settings import Settings

    from .surveillance_stack import start_regulator_stack

    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:ehr",
    )
    yield from start_regulator_stack(settings, tmp_path)
