"""``concierge terminology``: load a SNOMED CT release (RF2, as NHS TRUD ships it) or FHIR
ValueSets into the site's terminology store, and look concepts up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _store() -> Any:
    from concierge.configuration import load_configuration
    from terminology.store import TerminologyStore

    # the whole tree is checked: a wrong value is one line and exit 2, not a traceback
    configuration = load_configuration()
    terms = configuration.terminology
    return TerminologyStore(
        terms.resolved_store_url(configuration.settings.home), terms.language_refset_ids
    )


def _terminology() -> Any:
    from concierge.configuration import load_configuration
    from terminology.expand import Terminology

    return Terminology(_store(), load_configuration().terminology.max_expansion)


def _line(concept: dict[str, Any]) -> str:
    tag = f" ({concept['semantic_tag']})" if concept.get("semantic_tag") else ""
    inactive = "" if concept.get("active", True) else " [inactive]"
    return f"{concept['code']:>18}  {concept.get('term')}{tag}{inactive}  " + (
        f"[{concept['descendants']} below]"
    )


def _emit(payload: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            click.echo(line)


@click.group()
def terminology() -> None:
    """The site's terminology store (CONCIERGE_TERMINOLOGY_STORE_URL)."""


@terminology.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--version", "version", help="Record the release under this version URI")
@click.option("--json", "as_json", is_flag=True, help="One JSON object")
def load(path: Path, version: str | None, as_json: bool) -> None:
    """Load PATH: an RF2 release folder or zip (Snapshot files; the current release is
    replaced), or FHIR ValueSet JSON files (a resource or a Bundle each), or both.

    A running API notices the load and re-expands the saved questions whose ECL or ValueSets
    now mean other codes (CONCIERGE_TERMINOLOGY_REFRESH_SECONDS)."""
    from core.settings import ConfigurationError
    from terminology.rf2 import ReleaseError
    from terminology.valuesets import ValueSetError

    try:
        report = _store().load(path, version)
    except (ReleaseError, ValueSetError) as exc:
        raise click.ClickException(str(exc)) from None
    except ConfigurationError:
        raise
    lines = []
    release = report.get("release")
    if release:
        lines.append(
            f"loaded {release['version']}: {release['active_concepts']} active concepts of "
            f"{release['concepts']}, {release['is_a']} active is-a rows, "
            f"{release['descriptions']} descriptions in {release['load_seconds']} s"
        )
    for vs in report.get("valuesets", ()):
        lines.append(
            f"loaded ValueSet {vs['url']}" + (f"|{vs['version']}" if vs["version"] else "")
        )
    _emit(report, as_json, lines)


@terminology.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """The current release, earlier loads and the ValueSets loaded."""
    store = _store()
    info = store.current()
    payload = {
        "release": info.to_dict() if info else None,
        "history": store.history(),
        "valuesets": store.valuesets(),
        "generation": store.generation(),
    }
    lines = [
        f"release: {info.version} ({info.active_concepts} active concepts, loaded "
        f"{info.loaded_at:%Y-%m-%d %H:%M} from {info.source})"
        if info
        else "release: none loaded (concierge terminology load PATH)"
    ]
    lines += [
        f"ValueSet: {v['url']}|{v['version'] or ''}".rstrip("|") for v in payload["valuesets"]
    ]
    _emit(payload, as_json, lines)


@terminology.command()
@click.argument("words", nargs=-1, required=True)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option("--json", "as_json", is_flag=True)
def search(words: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Concepts by description words (each a word prefix) or by id."""
    found = [c.to_dict() for c in _store().search(" ".join(words), limit)]
    _emit(found, as_json, [_line(c) for c in found] or ["no concept found"])


def _concept(code: str) -> Any:
    from terminology.store import NoRelease

    store = _store()
    if not code.isdigit():
        raise click.ClickException(f"{code} is not a SNOMED CT id")
    try:
        detail = store.concept(int(code))
    except NoRelease as exc:
        raise click.ClickException(str(exc)) from None
    if detail is None:
        raise click.ClickException(f"no concept {code} in the loaded release")
    return store, detail


@terminology.command()
@click.argument("code")
@click.option("--json", "as_json", is_flag=True)
def children(code: str, as_json: bool) -> None:
    """A concept, its parents and its children."""
    _, detail = _concept(code)
    payload = detail.to_dict()
    lines = [_line(payload), "parents:"]
    lines += ["  " + _line(p) for p in payload["parents"]] or ["  (none)"]
    lines.append("children:")
    lines += ["  " + _line(c) for c in payload["children"]] or ["  (none)"]
    _emit(payload, as_json, lines)


@terminology.command()
@click.argument("code")
@click.option("--json", "as_json", is_flag=True)
def ancestors(code: str, as_json: bool) -> None:
    """Every ancestor of a concept, the most general first."""
    store, detail = _concept(code)
    found = [a.to_dict() for a in store.ancestors(int(code))]
    _emit(found, as_json, [_line(detail.concept.to_dict()), *("  " + _line(a) for a in found)])


@terminology.command()
@click.argument("expression")
@click.option("--json", "as_json", is_flag=True)
def expand(expression: str, as_json: bool) -> None:
    """The concepts an ECL expression selects in the loaded release."""
    from terminology.expand import ExpansionFailed

    try:
        expansion = _terminology().expand_ecl(expression)
    except ExpansionFailed as exc:
        raise click.ClickException(str(exc)) from None
    codes = [c for cs in expansion.codes.values() for c in cs]
    lines = [f"{len(codes)} concepts in {expansion.release}", *expansion.warnings]
    lines += [f"  {line}" for line in codes[:50]] + (["  ..."] if len(codes) > 50 else [])
    _emit(expansion.to_dict(), as_json, lines)
