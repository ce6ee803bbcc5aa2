"""``concierge feasibility import-atlas``: an ATLAS (OHDSI Circe) cohort definition as our
criteria, translated here (no API needed), with the report of what did not translate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from feasibility.atlas import ACCEPTABLE


@click.command("import-atlas")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--accept",
    multiple=True,
    type=click.Choice(sorted(ACCEPTABLE)),
    help="Accept a kind of difference that changes the meaning (repeat for several): "
    + "; ".join(f"{k}: {v}" for k, v in ACCEPTABLE.items()),
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the criteria")
@click.option("--title", help="The question's title (default: the definition's name)")
def import_atlas(path: Path, accept: tuple[str, ...], out: Path | None, title: str | None) -> None:
    """Translate PATH (the JSON ATLAS exports) into criteria (concierge.criteria/1): printed,
    or written to --out, ready for `concierge feasibility ask` or `register`. What did not
    translate exactly is listed on stderr; a part that changes the meaning refuses the import
    (exit 1) unless its kind is given with --accept."""
    from feasibility.atlas import AtlasImportError
    from feasibility.atlas import import_atlas as translate

    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path} is not JSON: {exc}") from None
    try:
        imported = translate(document, accept, title)
    except AtlasImportError as exc:
        for issue in exc.report.issues:
            click.echo(_issue(issue.to_dict(), accept), err=True)
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    for issue in imported.report.issues:
        click.echo(_issue(issue.to_dict(), accept), err=True)
    text = json.dumps(imported.criteria, indent=2)
    if out is not None:
        out.write_text(text + "\n")
        click.echo(f"criteria written to {out}", err=True)
    else:
        sys.stdout.write(text + "\n")


def _issue(issue: dict[str, object], accepted: tuple[str, ...]) -> str:
    mark = "note"
    if issue["changes_meaning"]:
        mark = "accepted" if issue["kind"] in accepted else "changes the meaning"
    return f"{mark} [{issue['kind']}] {issue['path']}: {issue['what']}"
