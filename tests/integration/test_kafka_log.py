"""librdkafka's own log lines from a real client: raw on stderr without a logger (not JSON: the
CI failure of stop 27 was ``%6|…|BGQUEUE|rdkafka#producer-5| … Purging 1 unserved events from
background queue`` in a worker's log, from an admin client destroyed with a request pending),
records of the ``librdkafka`` logger with :func:`infra.kafka_log.routed`.

The BGQUEUE line depends on a race (a response arriving as the client is destroyed), so the test
makes librdkafka log deterministically instead: a connection refused by a closed port, then a
pending request destroyed with the client."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, logging, sys, time
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient
    from infra.kafka_log import routed

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOGGED %(name)s %(message)s")
    config = {"bootstrap.servers": sys.argv[1], "reconnect.backoff.ms": 100}
    admin = AdminClient(routed(config) if sys.argv[2] == "routed" else config)
    pending = admin.describe_topics(TopicCollection(["concierge-no-such-topic"]))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        admin.poll(0.2)
    del admin, pending
    gc.collect()
    time.sleep(0.5)
    """
)


def _run(bootstrap: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, bootstrap, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_librdkafka_lines_are_python_log_records_only_when_routed(kafka_bootstrap: str) -> None:
    closed = "127.0.0.1:1"  # nothing listens on port 1: every connection is refused
    plain = _run(closed, "plain")
    assert "|FAIL|rdkafka#" in plain.stderr  # the raw format reaches stderr: the fault is real
    routed = _run(closed, "routed")
    assert routed.stderr == ""
    assert "LOGGED librdkafka FAIL [rdkafka#" in routed.stdout
    # and against the real broker, a routed client destroyed with a request pending is quiet
    assert _run(kafka_bootstrap, "routed").stderr == ""
