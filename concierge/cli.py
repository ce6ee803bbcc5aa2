"""The ``concierge`` command line. Verbs are loaded lazily so ``--help`` stays fast."""

from __future__ import annotations

import importlib
from typing import Any

import click

#: verb -> "module:attribute" of a click command or group.
VERBS: dict[str, str] = {
    "broker": "concierge.commands.infra:broker",
    "topics": "concierge.commands.infra:topics",
    "ingest": "concierge.commands.ingest:ingest",
    "api": "concierge.commands.api:api",
    "monitor": "concierge.commands.monitor:monitor",
    "deadletter": "concierge.commands.deadletter:deadletter",
    "dashboard": "concierge.commands.dashboard:dashboard",
    "worker": "concierge.commands.worker:worker",
    "generate": "concierge.commands.generate:generate",
    "stats": "concierge.commands.stats:stats",
    "demo": "concierge.demo:demo",
    "feasibility": "concierge.commands.feasibility:feasibility",
    "recruitment": "concierge.commands.recruitment:recruitment",
    "followup": "concierge.commands.followup:followup",
    "token": "concierge.commands.admin:token",
    "audit": "concierge.commands.admin:audit",
    "terminology": "concierge.commands.terminology:terminology",
    "hub": "concierge.commands.federation:hub",
    "concept-map": "concierge.commands.federation:concept_map",
    "node": "concierge.commands.federation:node",
}


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        """Run the verb; a bad configuration value is one line on stderr and status 2."""
        from core.settings import ConfigurationError

        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            click.echo(f"concierge: {exc}", err=True)
            ctx.exit(2)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = VERBS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a verb whose package is not built yet
            if exc.name and module_name.startswith(exc.name):
                return None
            raise
        command: click.Command = getattr(module, attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trial-concierge")
def main(**_: Any) -> None:
    """Clinical trial feasibility and recruitment concierge with a streaming surveillance core.

    Configuration is by environment variables (CONCIERGE_*, KAFKA_BOOTSTRAP_SERVERS); see the
    README.
    """
