"""Fault injection for tests: a private broker that can be killed, ports below the ephemeral range.

The session's shared broker (started by ``scripts/test.sh``) must stay up for every other test, so a
test that kills or restarts the broker starts one of its own with :class:`PrivateBroker`: the same
Kafka jars (cached under ``CONCIERGE_HOME``), its own ports and data folder. ``kill()`` is SIGKILL
of the JVM (no controlled shutdown); ``restart()`` starts it again on the same data, so topics,
offsets and committed group offsets survive exactly as they would on a real machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading
import time
from pathlib import Path

from infra import broker as broker_mod

#: Servers started by tests take ports from here: below the kernel's ephemeral range (32768 and
#: up), where a port handed out by ``bind(0)`` to a client could be taken by the time we listen.
_PORTS = iter(range(20000 + (os.getpid() % 200) * 40, 32000))
_PORTS_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback port below 32768 that nothing listens on now."""
    with _PORTS_LOCK:
        for port in _PORTS:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port below 32000")


def _home() -> Path:
    return Path(os.environ.get("CONCIERGE_HOME", Path.home() / ".local/share/concierge"))


class PrivateBroker:
    """A single-node KRaft broker of a test's own (fresh data folder each ``start``)."""

    def __init__(self, port: int | None = None, controller_port: int | None = None) -> None:
        self.config = broker_mod.BrokerConfig(
            home=_home(),
            version=os.environ.get("CONCIERGE_KAFKA_VERSION", broker_mod.DEFAULT_VERSION),
            port=port or free_port(),
            controller_port=controller_port or free_port(),
            heap="512m",
        )

    @property
    def bootstrap(self) -> str:
        return self.config.bootstrap

    def start(self, reset: bool = True) -> PrivateBroker:
        broker_mod.start(self.config, reset=reset)
        return self

    def kill(self) -> None:
        """SIGKILL the broker's JVM and wait until its port no longer answers."""
        pid = broker_mod._pid(self.config)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and broker_mod.answers(self.bootstrap, timeout=0.5):
            time.sleep(0.2)
        self.config.pid_file.unlink(missing_ok=True)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Kill, stay down ``down_seconds``, start again on the same data."""
        self.kill()
        time.sleep(down_seconds)
        broker_mod.start(self.config, reset=False)

    def stop(self) -> None:
        broker_mod.stop(self.config)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port`` (Linux's /proc/net/tcp{,6})."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel writes each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(words if width == 32 else words[:4])))
    return found


__all__ = ["PrivateBroker", "free_port", "listening_addresses"]
