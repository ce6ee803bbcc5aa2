"""``concierge ingest``: files and folders of FHIR into the facts topics, with progress."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from core.settings import get_settings
from fhir_adapters.sources import expand, ingest_file


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option(
    "--source", help="Source system recorded in provenance (default: CONCIERGE_SOURCE_SYSTEM)."
)
@click.option(
    "--validation",
    type=click.Choice(["fast", "full"]),
    default=None,
    help="fast: checked extraction (default); full: fhir.resources validates every resource first.",
)
@click.option(
    "--fhir-version",
    type=click.Choice(["auto", "R4", "R5"]),
    default="auto",
    show_default=True,
    help="FHIR release of the input (auto: R4 unless the input is "
    "R5-only, e.g. a subscription-notification Bundle or DeviceUsage).",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def ingest(
    paths: tuple[Path, ...],
    as_json: bool,
    source: str | None,
    validation: str | None,
    fhir_version: str,
    quiet: bool,
) -> None:
    """Ingest FHIR files and folders: JSON resources or Bundles, and Bulk Data NDJSON.

    Every resource ends accepted (facts published), unchanged (seen before), skipped (a type the
    product does not use) or dead-lettered (invalid, with an OperationOutcome). Folders are read
    recursively; reference data and Patients go first so references resolve.
    """
    from fhir_adapters.service import build_ingestor

    logging.basicConfig(level=logging.WARNING)
    try:
        files = expand(paths)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    settings = get_settings()
    ingestor = build_ingestor(settings, source=source, validation_mode=validation)
    version = None if fhir_version == "auto" else fhir_version
    show = (not quiet and not as_json) or (not quiet and sys.stderr.isatty())
    last = time.perf_counter()
    try:
        for index, path in enumerate(files, start=1):
            for _ in ingest_file(ingestor, path, version):  # type: ignore[arg-type]
                now = time.perf_counter()
                if show and now - last >= 1.0:
                    last = now
                    _progress(ingestor.stats.to_dict(), index, len(files))
        ingestor.commit()
    finally:
        ingestor.vault.close()
    summary = ingestor.stats.to_dict()
    summary["files"] = len(files)
    if as_json:
        click.echo(json.dumps(summary))
        return
    if show:
        click.echo("", err=True)
    click.echo(
        f"Ingested {summary['total']} resources from {len(files)} files in {summary['seconds']} s:"
    )
    click.echo(
        f"  accepted {summary['accepted']}, unchanged {summary['unchanged']}, "
        f"skipped {summary['skipped']}, dead-lettered {summary['dead_lettered']}"
    )
    width = max((len(t) for t in summary["by_resource_type"]), default=10)
    for rtype, counts in summary["by_resource_type"].items():
        click.echo(f"  {rtype:<{width}}  " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    for gap in summary["subscription_gaps"]:
        click.echo(f"  gap in {gap['subscription']}: {gap['missing']} events missing")


def _progress(summary: dict[str, object], index: int, files: int) -> None:
    total = summary["total"]
    seconds = float(summary["seconds"])  # type: ignore[arg-type]
    rate = int(total / seconds) if seconds else 0  # type: ignore[operator]
    click.echo(
        f"\r  file {index}/{files}: {total} resources ({rate}/s), accepted {summary['accepted']}, "
        f"skipped {summary['skipped']}, dead-lettered {summary['dead_lettered']}   ",
        err=True,
        nl=False,
    )
