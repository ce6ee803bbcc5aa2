"""A local single-node Apache Kafka broker (KRaft, combined broker and controller).

The broker's jars come from Maven Central through Maven (``infra/kafka/pom.xml``), are cached
under ``$CONCIERGE_HOME/kafka/<version>/lib``, and run on this machine's JVM. Nothing is
downloaded from anywhere else. Configured for loopback only, with replication factors of 1 so
transactions and consumer groups work on one node.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from infra.kafka_log import routed
from infra.settings import DEFAULT_VERSION, BrokerSettings

POM = Path(__file__).parent / "kafka" / "pom.xml"
LOG4J = Path(__file__).parent / "kafka" / "log4j2.properties"


class BrokerError(RuntimeError):
    pass


@dataclass(frozen=True)
class BrokerConfig:
    home: Path
    version: str = DEFAULT_VERSION
    port: int = 9092
    controller_port: int = 9093
    heap: str = "768m"

    @classmethod
    def from_settings(cls, home: Path, section: BrokerSettings | None = None) -> BrokerConfig:
        """The broker under ``home`` as the broker section says (read from the environment when
        none is given)."""
        section = section if section is not None else BrokerSettings()
        return cls(home=home, **section.model_dump())

    @property
    def lib(self) -> Path:
        return self.home / "kafka" / self.version / "lib"

    @property
    def data_dir(self) -> Path:
        return self.home / "kafka" / f"broker-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def render_properties(config: BrokerConfig) -> str:
    """server.properties for a combined broker/controller on loopback."""
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{config.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{config.port},"
            f"CONTROLLER://127.0.0.1:{config.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{config.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={config.data_dir / 'logs'}",
            "num.partitions=3",
            "auto.create.topics.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=10",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.hours=-1",
            "log.segment.bytes=104857600",
            "message.max.bytes=10485760",
            "",
        ]
    )


def fetch(config: BrokerConfig) -> Path:
    """Copy the broker's jars from Maven Central (through ~/.m2) into the cache; idempotent."""
    marker = config.lib / ".complete"
    if marker.exists():
        return config.lib
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is needed to fetch Kafka: apt-get install maven")
    config.lib.mkdir(parents=True, exist_ok=True)
    command = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={config.lib}",
        "-DincludeScope=runtime",
        f"-Dkafka.version={config.version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise BrokerError(
            f"fetching Kafka {config.version} with Maven failed:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    if not list(config.lib.glob(f"kafka_2.13-{config.version}.jar")):
        raise BrokerError(f"Maven ran but kafka_2.13-{config.version}.jar is not in {config.lib}")
    marker.touch()
    return config.lib


def answers(bootstrap: str, timeout: float = 3.0) -> bool:
    try:
        metadata = AdminClient(
            routed({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "log_level": 0})
        ).list_topics(timeout=timeout)
    except Exception:  # any failure to reach it means "not answering"
        return False
    return bool(metadata.brokers)


def _java(config: BrokerConfig) -> list[str]:
    return ["java", "-cp", f"{config.lib}/*"]


def _pid(config: BrokerConfig) -> int | None:
    try:
        pid = int(config.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        # A broker started by this very process (tests) becomes a zombie when it exits, and a
        # zombie still answers kill(0): reap it first, so an exited broker reads as stopped.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child: the CLI started it in another process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def cluster_id(random: Callable[[], uuid.UUID] = uuid.uuid4) -> str:
    """A random cluster id in urlsafe base64, never starting with "-": the storage tool's parser
    takes such a value for an option and refuses to format (1 start in 64 failed so; Kafka's own
    random ids avoid the same)."""
    while True:
        cluster = base64.urlsafe_b64encode(random().bytes).decode().rstrip("=")
        if not cluster.startswith("-"):
            return cluster


def _format(config: BrokerConfig, properties: Path) -> None:
    if (config.data_dir / "logs" / "meta.properties").exists():
        return
    cluster = cluster_id()
    result = subprocess.run(
        [
            *_java(config),
            f"-Dlog4j2.configurationFile={LOG4J}",
            f"-Dkafka.logs.dir={config.data_dir}",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster,
            "-c",
            str(properties),
            "--standalone",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        # Older 4.x releases reject --standalone with controller.quorum.voters: retry without.
        result = subprocess.run(
            [
                *_java(config),
                f"-Dlog4j2.configurationFile={LOG4J}",
                f"-Dkafka.logs.dir={config.data_dir}",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster,
                "-c",
                str(properties),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if result.returncode != 0:
        raise BrokerError(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")


def start(config: BrokerConfig, timeout: float = 120.0, reset: bool = False) -> dict[str, Any]:
    """Start the broker (fetching and formatting first if needed); return once it answers."""
    if reset:
        stop(config)
        shutil.rmtree(config.data_dir, ignore_errors=True)
    if answers(config.bootstrap):
        return {**status(config), "started": False, "note": "a broker already answers"}
    if shutil.which("java") is None:
        raise BrokerError(
            "Java 17+ is needed to run Kafka: apt-get install openjdk-17-jre-headless"
        )
    fetch(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    properties = config.data_dir / "server.properties"
    properties.write_text(render_properties(config))
    _format(config, properties)
    log = config.data_dir / "broker.out"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                *_java(config),
                "-Xms256m",
                f"-Xmx{config.heap}",
                "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={LOG4J}",
                f"-Dkafka.logs.dir={config.data_dir}",
                "kafka.Kafka",
                str(properties),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    config.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(
                f"the broker exited with {proc.returncode}; last log lines:\n" + _tail(config)
            )
        if answers(config.bootstrap, timeout=2):
            return {**status(config), "started": True}
        time.sleep(0.5)
    raise BrokerError(
        f"the broker did not answer within {timeout:.0f} s; last log lines:\n" + _tail(config)
    )


def _tail(config: BrokerConfig, lines: int = 30) -> str:
    chunks = []
    for name in ("broker.out", "server.log"):
        path = config.data_dir / name
        if path.exists():
            chunks.extend(path.read_text(errors="replace").splitlines()[-lines:])
    return "\n".join(chunks[-lines:])


def stop(config: BrokerConfig, timeout: float = 30.0) -> bool:
    """Stop the broker this project started (SIGTERM, then SIGKILL). True if one was running."""
    pid = _pid(config)
    if pid is None:
        config.pid_file.unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid(config) is not None:
        time.sleep(0.3)
    if _pid(config) is not None:
        os.killpg(pid, signal.SIGKILL)
    config.pid_file.unlink(missing_ok=True)
    return True


def status(config: BrokerConfig) -> dict[str, Any]:
    running = answers(config.bootstrap)
    topics = None
    if running:
        metadata = AdminClient(routed({"bootstrap.servers": config.bootstrap})).list_topics(
            timeout=5
        )
        topics = len([t for t in metadata.topics if not t.startswith("__")])
    return {
        "running": running,
        "pid": _pid(config),
        "bootstrap": config.bootstrap,
        "version": config.version,
        "data_dir": str(config.data_dir),
        "jars_cached": (config.lib / ".complete").exists(),
        "topics": topics,
    }
