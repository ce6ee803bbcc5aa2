"""The worker's device counters follow ``CONCIERGE_STREAM_DEVICE_COUNTERS`` (no broker needed to
build the app; ``tests/integration/test_device_signals.py`` runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from surveillance_stream.app import create_app
from surveillance_stream.device_stream import DeviceContributions


@pytest.mark.parametrize("enabled", [True, False])
def test_device_counters_can_be_switched_off(tmp_path: Path, enabled: bool) -> None:
    settings = Settings(
        home=tmp_path, kafka_bootstrap_servers="127.0.0.1:1", stream_device_counters=enabled
    )
    stream = create_app(settings)
    assert isinstance(stream.devices, DeviceContributions) is enabled
    assert (stream.devices.on_changes in stream.on_change) if enabled else not stream.on_change
