"""The federated demo: three nodes with different populations and a hub, on this machine.

Each node is ``concierge api`` in its own process with its own topic prefix on the local broker,
its own home (identity vault, registry, budget, audit trail), pseudonym key, token key and
Ed25519 key; the hub is ``concierge hub serve`` with its own key and home. The demo ingests a
synthetic population at each node (different sizes and seeds), registers the nodes at the hub,
asks the hub one sponsor question and prints the federated, protected answer.
:class:`Federation` is also what ``benchmarks/bench_hub.py`` starts.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import httpx

#: The demo's nodes: name -> (patients, seed); sizes scale with ``--scale``.
NODES = {"north": (900, 101), "south": (600, 202), "west": (300, 303)}
#: The question the demo asks.
T2DM: dict[str, Any] = {
    "schema": "concierge.criteria/1",
    "title": "Type 2 diabetes",
    "index_date": "2026-01-01",
    "inclusion": [{"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    token_key: str
    log: Path


@dataclass
class Federation:
    """Three nodes (``concierge api``) and a hub (``concierge hub serve``) in processes of their
    own, over one broker with a topic prefix per node."""

    root: Path
    bootstrap: str
    nodes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(NODES))
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    processes: dict[str, Process] = field(default_factory=dict)
    #: Also a ``concierge worker`` per node (live saved questions, cohort history, sites).
    workers: bool = False
    worker_processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int) -> Process:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", *argv, "--port", str(port)],
            env={**os.environ, **env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = Process(name, f"http://127.0.0.1:{port}", proc, env["CONCIERGE_TOKEN_KEY"], log)
        self.processes[name] = process
        return process

    def _spawn_worker(self, name: str, env: dict[str, str]) -> None:
        """The node's worker: its own home, the node's topic prefix."""
        log = self.root / f"{name}-worker.log"
        worker_env = {
            **env,
            "CONCIERGE_HOME": str(self.root / name / "worker"),
            "CONCIERGE_WORKER_WEB_PORT": str(free_port()),
        }
        self.worker_processes[name] = subprocess.Popen(
            [sys.executable, "-m", "concierge", "worker", "--loglevel", "warning"],
            env={**os.environ, **worker_env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ingest(self, name: str, patients: int, seed: int) -> None:
        """A synthetic population at node ``name``, through its own pseudonym key and vault."""
        from pydantic import SecretStr

        from concierge.commands.generate import bundle
        from core.settings import Settings
        from fhir_adapters.service import build_ingestor
        from fhir_adapters.sinks import KafkaSink
        from fhir_adapters.synthetic.generator import (
            GeneratorConfig,
            iter_patients,
            iter_reference_resources,
        )
        from infra.topics_admin import ensure_topics

        prefix = self.prefix(name)
        ensure_topics(self.bootstrap, prefix)
        settings = Settings(
            kafka_bootstrap_servers=self.bootstrap,
            topic_prefix=prefix,
            home=self.root / name,
            source_system=f"urn:demo:{name}",
            pseudonym_key=SecretStr(self.pseudonym_key(name)),
        )
        config = GeneratorConfig(patients=patients, seed=seed, sites=3)
        ingestor = build_ingestor(settings, sink=KafkaSink(self.bootstrap, prefix))
        try:
            ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
            for record in iter_patients(config):
                ingestor.ingest_bundle(bundle(record), "demo")
            ingestor.commit()
        finally:
            ingestor.vault.close()

    def prefix(self, name: str) -> str:
        return f"fed-{self.run}-{name}."

    def pseudonym_key(self, name: str) -> str:
        path = self.root / name / "pseudonym.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
        return path.read_text()

    def start(self, ready_timeout: float = 300.0) -> Federation:
        from federation.hub import NodeDirectory, NodeRecord
        from federation.tokens import generate_key

        keys = self.root / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        hub_private, hub_public = generate_key()
        (keys / "hub.key").write_bytes(hub_private)
        (keys / "hub.pub").write_bytes(hub_public)
        directory = NodeDirectory(self.root / "hub" / "nodes.json")
        for name, (patients, seed) in self.nodes.items():
            self.ingest(name, patients, seed)
            private, public = generate_key()
            (keys / f"{name}.key").write_bytes(private)
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "CONCIERGE_TOPIC_PREFIX": self.prefix(name),
                "CONCIERGE_HOME": str(self.root / name),
                "CONCIERGE_PSEUDONYM_KEY": self.pseudonym_key(name),
                "CONCIERGE_TOKEN_KEY": secrets.token_hex(32),
                "CONCIERGE_RECRUITMENT_API": "false",
                "CONCIERGE_SURVEILLANCE_MONITOR": "false",
                "CONCIERGE_AUDIT_ANCHOR_SECONDS": "0",
                "CONCIERGE_NODE_ID": name,
                "CONCIERGE_NODE_KEY_FILE": str(keys / f"{name}.key"),
                "CONCIERGE_NODE_HUB_PUBLIC_KEY_FILE": str(keys / "hub.pub"),
            }
            node = self._spawn(name, ["api"], env, free_port())
            if self.workers:
                self._spawn_worker(name, env)
            directory.register(NodeRecord(name, node.url, public.decode(), name.title()))
        hub_env = {
            "CONCIERGE_HOME": str(self.root / "hub-home"),
            "CONCIERGE_HUB_KEY_FILE": str(keys / "hub.key"),
            "CONCIERGE_HUB_NODES_FILE": str(directory.path),
            # a node's first answer on a loaded laptop can take seconds (the engine warms up)
            "CONCIERGE_HUB_DEADLINE_SECONDS": os.environ.get(
                "CONCIERGE_HUB_DEADLINE_SECONDS", "30"
            ),
            "CONCIERGE_TOKEN_KEY": secrets.token_hex(32),
            "CONCIERGE_AUDIT_ANCHOR_SECONDS": "0",
        }
        self._spawn("hub", ["hub", "serve"], hub_env, free_port())
        deadline = time.monotonic() + ready_timeout
        for name, process in self.processes.items():
            probe = "/healthz" if name == "hub" else "/readyz"
            while True:
                if process.proc.poll() is not None:
                    tail = process.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited ({process.proc.returncode}):\n{tail}")
                try:
                    if httpx.get(process.url + probe, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready within {ready_timeout} s")
                time.sleep(0.5)
        return self

    def token(self, name: str, role: str = "sponsor", org: str = "Acme Pharma") -> str:
        """A token of ``name``'s own site (the hub's for ``hub``)."""
        from core.auth import issue

        return issue(self.processes[name].token_key.encode(), role, org)  # type: ignore[arg-type]

    def ask_hub(self, criteria: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        hub = self.processes["hub"]
        response = httpx.post(
            f"{hub.url}/v1/hub/ask",
            json={"criteria": criteria},
            headers={"Authorization": f"Bearer {self.token('hub')}"},
            timeout=timeout,
        )
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def ask_node(self, name: str, criteria: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """The node's own sponsor answer (``/v1/feasibility/ask``), not through the hub."""
        node = self.processes[name]
        response = httpx.post(
            f"{node.url}/v1/feasibility/ask",
            json=criteria,
            headers={"Authorization": f"Bearer {self.token(name)}"},
            timeout=timeout,
        )
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def hub_call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """A sponsor's call to the hub (``path`` under ``/v1/hub``)."""
        hub = self.processes["hub"]
        response = httpx.request(
            method,
            f"{hub.url}/v1/hub{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token('hub')}"},
            timeout=timeout,
        )
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def stop(self) -> None:
        procs = [p.proc for p in self.processes.values()] + list(self.worker_processes.values())
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def summary(answer: dict[str, Any]) -> str:
    """The federated answer in a few lines."""
    lines = [
        f"question: {T2DM['title']} (nodes answered: {', '.join(answer['nodes_answered'])}; "
        f"missing: {[m['node'] for m in answer['nodes_missing']] or 'none'})",
        f"  total (protected): {answer['total']['display']}",
    ]
    lines += [f"  {node}: {cell['display']}" for node, cell in answer["by_node"].items()]
    lines += [
        f"  region {region}: {cell['display']}" for region, cell in answer["by_region"].items()
    ]
    lines += [f"  note: {note}" for note in answer["notes"]]
    return "\n".join(lines)


def sites_summary(answer: dict[str, Any]) -> str:
    """Site selection across nodes in a few lines: the ranking, then the trial's forecast."""
    target = answer["target"]
    lines = [
        f"site selection across nodes (target {target['target']}, still needed "
        f"{target['remaining']}; nodes answered: {', '.join(answer['nodes_answered']) or 'none'})"
    ]
    lines += [f"  missing {m['node']}: {m['reason']}" for m in answer["nodes_missing"]]
    for row in answer["sites"][:8]:
        projection = row["projection"]
        when = (
            f"{projection['median_days']} days" if projection.get("forecast") else
            f"no projection ({projection.get('reason')})"
        )  # fmt: skip
        lines.append(
            f"  {row['rank'] or '-'}. {row['site']} ({', '.join(row['nodes'])}): eligible now "
            f"{row['eligible_now']['display']}; {when}"
        )
    trial = answer["forecast"]
    lines += [f"  left out of the forecast, {x['node']}: {x['reason']}" for x in trial["left_out"]]
    if trial.get("forecast"):
        lines.append(
            f"  trial: target reached around {trial['projected_date']} "
            f"(90% interval {trial['interval'][0]} to {trial['interval'][1] or 'beyond'})"
        )
    else:
        lines.append(f"  trial: no forecast yet ({trial.get('reason')})")
    return "\n".join(lines)


@click.command()
@click.option("--scale", type=click.FloatRange(min=0.05, max=20), default=1.0, show_default=True,
              help="Multiply each node's population (900, 600 and 300 patients).")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the nodes and the hub running until Ctrl-C.")
def main(scale: float, keep: bool) -> None:
    """Three nodes with different populations and a hub on this machine: ask the hub, print the
    federated answer."""
    from core.settings import get_settings

    settings = get_settings()
    root = Path(settings.home) / "federated-demo" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    nodes = {n: (max(20, int(p * scale)), s) for n, (p, s) in NODES.items()}
    with Federation(root, settings.kafka_bootstrap_servers, nodes, workers=True) as federation:
        click.echo(f"ingesting {nodes} and starting three nodes and a hub (logs in {root}) ...")
        federation.start()
        answer = federation.ask_hub(T2DM)
        click.echo(summary(answer))
        click.echo(json.dumps(answer, indent=2))
        # a saved question at every node, with a target: every node's sites ranked together
        trial = "t2dm-federated-demo"
        federation.hub_call(
            "POST",
            "/saved-questions",
            {"id": trial, "title": T2DM["title"], "criteria": T2DM, "target": 60},
        )
        click.echo("waiting for each node's worker to evaluate the saved question ...")
        deadline = time.monotonic() + 180
        while True:
            sites = federation.hub_call("GET", f"/saved-questions/{trial}/sites")
            if not sites["partial"] or time.monotonic() > deadline:
                break
            time.sleep(3)
        click.echo(sites_summary(sites))
        if keep:
            for name, process in federation.processes.items():
                click.echo(f"{name}: {process.url}  (log {process.log})")
            click.echo("Ctrl-C stops the nodes and the hub")
            wanted = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
            signal.sigwait(wanted)


if __name__ == "__main__":
    main()
