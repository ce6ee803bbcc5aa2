from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import describe
from infra.broker import BrokerConfig, render_properties
from infra.settings import BrokerSettings


def test_properties_bind_loopback_and_allow_single_node_transactions(tmp_path: Path) -> None:
    config = BrokerConfig(home=tmp_path, port=19092, controller_port=19093)
    props = dict(line.split("=", 1) for line in render_properties(config).splitlines() if line)
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["process.roles"] == "broker,controller"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["log.dirs"].startswith(str(tmp_path))


def test_ports_and_version_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCIERGE_BROKER_PORT", "29092")
    monkeypatch.setenv("CONCIERGE_CONTROLLER_PORT", "29093")
    monkeypatch.setenv("CONCIERGE_KAFKA_VERSION", "4.2.0")
    config = BrokerConfig.from_settings(tmp_path)
    assert config.bootstrap == "127.0.0.1:29092"
    assert config.controller_port == 29093
    assert config.lib == tmp_path / "kafka" / "4.2.0" / "lib"
    assert config.data_dir == tmp_path / "kafka" / "broker-29092"


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("CONCIERGE_BROKER_PORT", "90x2"),
        ("CONCIERGE_BROKER_PORT", "70000"),
        ("CONCIERGE_CONTROLLER_PORT", "0"),
        ("CONCIERGE_KAFKA_VERSION", "latest"),
        ("CONCIERGE_BROKER_HEAP", "lots"),
    ],
)
def test_a_bad_broker_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, bad: str
) -> None:
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValidationError) as caught:
        BrokerSettings()
    assert describe(caught.value, [BrokerSettings]).startswith(
        f"bad configuration: {name}={bad!r}: "
    )


def test_cluster_ids_never_start_with_a_dash() -> None:
    """The storage tool reads an id beginning with "-" as an option and refuses to format."""
    import uuid

    from infra.broker import cluster_id

    ids = iter([uuid.UUID(bytes=bytes([0xF8]) + bytes(15)), uuid.UUID(int=1)])
    found = cluster_id(lambda: next(ids))
    assert found == "AAAAAAAAAAAAAAAAAAAAAQ"
    assert all(not cluster_id().startswith("-") for _ in range(500))
