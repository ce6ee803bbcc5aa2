"""The relay thread outlives a database error (the demo's ended on one ``database is locked``
and the trial feeds stopped while the service ran on)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.db import make_engine, make_sessionmaker
from followup.relay import Relay


def test_a_database_error_is_retried_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.sqlite'}")
    relay = Relay(make_sessionmaker(engine), "127.0.0.1:1")
    stop = threading.Event()
    calls: list[int] = []

    def publish_once() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        stop.set()
        return 0

    relay.publish_once = publish_once  # type: ignore[method-assign]
    thread = threading.Thread(target=relay.run, args=(stop, 0.01))
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and len(calls) == 2
    assert "relay: database error (database is locked); retrying" in caplog.text
    engine.dispose()
