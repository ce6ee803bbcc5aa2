"""Audit anchors on the real broker: the API publishes the audit chain's head to the anchors
topic, and ``concierge audit verify --against-anchors`` (the real command, in a subprocess)
detects what the database alone cannot:

* a record rewritten and the chain rebuilt *with* the key (and, for completeness, without it);
* the newest records cut off, the head row moved back to match.

Also: the anchor published at shutdown, a broker that is down (requests served, the failure in
``/readyz``, a warning logged, then the anchors caught up once a broker answers), the topic's
own configuration, and messages on the topic that are not real anchors.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concierge.api import create_app
from core.audit import AuditKeys, AuditLog
from core.auth import issue
from core.settings import Settings
from infra.audit_anchors import AnchorPublisher, read_anchors, topic_problems
from infra.topics import AUDIT_ANCHORS, TopicSpec
from infra.topics_admin import ensure_topics
from tests.audit_helpers import rebuild, truncate
from tests.faults import PrivateBroker, free_port

pytestmark = pytest.mark.integration

AUDIT_KEY = "integration-audit-key-0123456789abcdef"


def _settings(bootstrap: str, prefix: str, home: Path, anchor_seconds: float) -> Settings:
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        home=home,
        feasibility_feed=False,
        recruitment_api=False,
        surveillance_monitor=False,
        audit_key=AUDIT_KEY,  # type: ignore[arg-type]
        audit_anchor_seconds=anchor_seconds,
    )


def _requests(client: TestClient, settings: Settings, n: int) -> list[float]:
    """``n`` audited requests (a sponsor reads the criteria schema); each one's duration."""
    token = issue(settings.token_key.get_secret_value().encode(), "sponsor", "Acme")
    durations = []
    for _ in range(n):
        started = time.monotonic()
        response = client.get(
            "/v1/feasibility/criteria-schema", headers={"Authorization": f"Bearer {token}"}
        )
        durations.append(time.monotonic() - started)
        assert response.status_code == 200, response.text
    return durations


def _wait(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def _verify(settings: Settings, url: str, *options: str) -> tuple[int, dict[str, Any], str]:
    """``concierge audit verify`` on the audit log at ``url``: status, JSON, summary."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONCIERGE_TOPIC_PREFIX": settings.topic_prefix,
        "CONCIERGE_AUDIT_URL": url,
        "CONCIERGE_AUDIT_KEY": AUDIT_KEY,
    }
    done = subprocess.run(
        [sys.executable, "-m", "concierge", "audit", "verify", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, json.loads(done.stdout), done.stderr


def _copy(source: Path, tmp_path: Path, name: str) -> tuple[str, AuditLog]:
    target = tmp_path / f"{name}.sqlite"
    # SQLite's backup, not a file copy: what is still in the write-ahead log comes along
    with sqlite3.connect(source) as original, sqlite3.connect(target) as copy:
        original.backup(copy)
    url = f"sqlite:///{target}"
    return url, AuditLog(url, AuditKeys(AUDIT_KEY.encode()))


def test_rewrites_and_truncation_are_detected_against_the_anchors(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix, tmp_path / "home", anchor_seconds=0.3)
    app = create_app(settings)
    with TestClient(app) as client:
        _requests(client, settings, 6)
        anchors: AnchorPublisher = app.state.audit_anchors
        _wait(
            lambda: (anchors.status()["last_anchor"] or {}).get("seq") == 6,
            30,
            "the head (record 6) anchored",
        )
        shown = client.get("/readyz").json()["audit_anchors"]
        assert shown["ok"] and shown["error"] is None and shown["last_anchor"]["seq"] == 6
        assert shown["topic"] == topic_prefix + AUDIT_ANCHORS
        _requests(client, settings, 4)
    assert anchors.status()["last_anchor"]["seq"] == 10  # at the latest at shutdown
    database = settings.home / "audit.sqlite"

    code, found, summary = _verify(settings, f"sqlite:///{database}", "--against-anchors")
    assert code == 0, summary
    assert found["records"] == 10 and found["anchors"]["anchors"] >= 2
    assert found["anchors"]["unanchored_records"] == 0 and found["anchors"]["problems"] == []
    assert topic_problems(kafka_bootstrap, topic_prefix + AUDIT_ANCHORS) == []

    # (a) record 3 rewritten and the chain rebuilt with the key: the database cannot tell
    url, log = _copy(database, tmp_path, "rebuilt-with-key")
    rebuild(log, AUDIT_KEY.encode(), {3: {"org": "Innocent Org"}})
    assert _verify(settings, url)[0] == 0
    code, found, summary = _verify(settings, url, "--against-anchors")
    assert code == 1 and not found["ok"] and found["anchors"]["first_bad_seq"] >= 3
    assert "the chain was rewritten from there or before" in summary
    assert any("record 10 is not the record anchored" in p for p in found["anchors"]["problems"])

    # the same without the key: found by the chain itself, and by the anchors
    url, log = _copy(database, tmp_path, "rebuilt-without-key")
    rebuild(log, b"a-guess-at-the-key-a-guess-at-the", {3: {"org": "Innocent Org"}})
    code, found, _ = _verify(settings, url, "--against-anchors")
    assert code == 1 and found["first_bad_seq"] == 3 and not found["anchors"]["ok"]

    # (b) the newest three records cut off, the head row moved back: the database cannot tell
    url, log = _copy(database, tmp_path, "truncated")
    truncate(log, 7)
    assert _verify(settings, url)[0] == 0
    code, found, summary = _verify(settings, url, "--against-anchors")
    assert code == 1 and found["anchors"]["database_seq"] == 7
    assert "the database ends at record 7: the newest records were removed" in summary


def test_the_head_is_anchored_at_shutdown(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix, tmp_path / "home", anchor_seconds=600)
    app = create_app(settings)
    with TestClient(app) as client:  # the first tick finds nothing; the next is 10 min away
        _requests(client, settings, 3)
        assert app.state.audit_anchors.status()["last_anchor"] is None
    published = list(read_anchors(kafka_bootstrap, topic_prefix + AUDIT_ANCHORS))
    head = app.state.audit.head()
    assert [(a.chain, a.seq, a.hmac) for a in published] == [(head.chain, 3, head.hash)]  # type: ignore[union-attr]


def test_a_broker_that_is_down_is_reported_never_blocks_and_anchors_catch_up(
    topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"  # nothing answers there yet
    settings = _settings(bootstrap, topic_prefix, tmp_path / "home", anchor_seconds=0.3)
    app = create_app(settings)
    publisher = AnchorPublisher(app.state.audit, bootstrap, topic_prefix, 0.3, timeout=2.0)
    app.state.audit_anchors = publisher.start()
    broker = PrivateBroker(port=port)
    caplog.set_level(logging.WARNING, logger="infra.audit_anchors")
    try:
        with TestClient(app) as client:
            durations = _requests(client, settings, 5)
            assert max(durations) < 1.5, durations  # not waiting for the broker (timeout 2 s)
            _wait(lambda: publisher.status()["error"], 30, "the failure recorded")
            ready = client.get("/readyz")
            assert ready.status_code == 200  # traffic is not refused for it
            shown = ready.json()["audit_anchors"]
            assert not shown["ok"] and shown["failing_since"] and shown["last_anchor"] is None
            assert shown["failed_attempts"] >= 1 and shown["error"]
            assert any("audit anchors not published" in r.getMessage() for r in caplog.records)

            broker.start()
            _wait(lambda: publisher.status()["ok"], 120, "anchors published once a broker answers")
            assert publisher.status()["last_anchor"]["seq"] == 5
            assert client.get("/readyz").json()["audit_anchors"]["ok"]
        check = app.state.audit.check_anchors(read_anchors(bootstrap, topic_prefix + AUDIT_ANCHORS))
        assert check.ok and check.latest["seq"] == 5 and check.unanchored_records == 0, check
    finally:
        broker.stop()


def test_the_topic_itself_and_messages_that_are_not_anchors(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix, tmp_path / "home", anchor_seconds=0.3)
    log = AuditLog(settings.resolved_audit_url(), AuditKeys(AUDIT_KEY.encode()))
    for i in range(3):
        log.append("admin:site", "admin", "Site", "GET /v1/x", {"i": i})
    publisher = AnchorPublisher(log, kafka_bootstrap, topic_prefix, 0.3, timeout=5.0)
    assert publisher.publish()
    topic = topic_prefix + AUDIT_ANCHORS
    assert log.check_anchors(read_anchors(kafka_bootstrap, topic)).ok

    real = next(iter(read_anchors(kafka_bootstrap, topic)))
    assert not isinstance(real, str)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    forged = real.model_copy(update={"seq": 2, "hmac": "0" * 64})  # signature left as it was
    producer.produce(topic, key=real.chain.encode(), value=forged.to_json())
    producer.produce(topic, key=real.chain.encode(), value=b"{not an anchor")
    assert producer.flush(10) == 0
    code, found, _ = _verify(settings, settings.resolved_audit_url(), "--against-anchors")
    assert code == 1
    problems = found["anchors"]["problems"]
    assert any("bad signature" in p for p in problems), problems
    assert any(p.startswith("not an anchor: partition 0 offset 2") for p in problems), problems

    # a topic of that name that compacts, or forgets, defeats the anchors: said so
    other = topic_prefix + "compacted."
    spec = TopicSpec(AUDIT_ANCHORS, 1, {"cleanup.policy": "compact", "retention.ms": "604800000"})
    ensure_topics(kafka_bootstrap, other, [spec])
    problems = topic_problems(kafka_bootstrap, other + AUDIT_ANCHORS)
    assert any("is compacted" in p for p in problems), problems
    assert any("retention.ms=604800000" in p for p in problems), problems


def test_without_anchoring_verify_has_nothing_to_check_against_and_fails(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """With anchoring off there is nothing to check against: verify says so and fails."""
    settings = _settings(kafka_bootstrap, topic_prefix, tmp_path / "home", anchor_seconds=0)
    app: FastAPI = create_app(settings)
    with TestClient(app) as client:
        _requests(client, settings, 2)
        assert getattr(app.state, "audit_anchors", None) is None
        assert "audit_anchors" not in client.get("/readyz").json()
    code, found, summary = _verify(settings, settings.resolved_audit_url(), "--against-anchors")
    assert code == 1 and found["ok"] is False and found["records"] == 2
    assert "no anchor of chain" in summary
