"""Exports of a past answer: CSV (one row per published cell) and a one-page HTML report (the
criteria in words, the funnel, the sites, the output's own tables, and the disclosure rules in
force). Both are made from the answer as it was sent: nothing is recomputed, so an export shows
exactly the protected cells the sponsor saw, withheld ones as ``withheld``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from html import escape
from typing import Any

from ..criteria import parse_question
from ..render import render
from .history import PastAnswer

CSV_COLUMNS = ("section", "item", "measure", "display", "value")


def _is_cell(value: Any) -> bool:
    return isinstance(value, dict) and "display" in value and "suppressed" in value


def cells(
    body: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every published cell (or ratio) of an answer, with the path to it."""
    if _is_cell(body):
        yield path, body
        return
    if isinstance(body, dict):
        for key, value in body.items():
            if key in ("policy", "as_of", "rules", "notes"):
                continue
            label = key
            if isinstance(value, dict) and "label" in value:
                label = str(value["label"])
            yield from cells(value, (*path, label))
    elif isinstance(body, list):
        for i, value in enumerate(body):
            label = str(i)
            if isinstance(value, dict):
                label = str(value.get("site") or value.get("label") or value.get("day") or i)
                if "day" in value and _is_cell(value):
                    yield (*path, label), value
                    continue
            yield from cells(value, (*path, label))


def _safe(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula (a step's label or a site's name
    starting with ``=``, ``+``, ``-`` or ``@``): a leading apostrophe, as OWASP advises."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_csv(past: PastAnswer) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for path, cell in cells(past.body):
        section = path[0] if path else ""
        item = "/".join(path[1:-1]) if len(path) > 2 else (path[1] if len(path) == 2 else "")
        measure = path[-1] if len(path) > 2 else ""
        value = cell.get("value")
        writer.writerow(
            (
                _safe(section),
                _safe(item),
                _safe(measure),
                _safe(str(cell["display"])),
                "" if value is None else value,
            )
        )
    return out.getvalue()


def _criteria_in_words(past: PastAnswer) -> str:
    try:
        return render(parse_question(past.question))
    except Exception as exc:  # a question saved by an older version: shown as JSON
        return f"(criteria could not be rendered: {type(exc).__name__})"


def _display(cell: Any) -> str:
    if _is_cell(cell):
        text = escape(str(cell["display"]))
        return f'<span class="withheld">{text}</span>' if cell["suppressed"] else text
    return "" if cell is None else escape(str(cell))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _style(scale: float = 1.0) -> str:
    """The report's CSS, its type and spacing at ``scale`` (the PDF shrinks to fit one page)."""

    def pt(size: float) -> str:
        return f"{size * scale:.2f}pt"

    def mm(size: float) -> str:
        return f"{size * scale:.2f}mm"

    return f"""
@page {{ size: A4; margin: 12mm; }}
body {{ font: {pt(10)} system-ui, sans-serif; color: #1d2733; max-width: 190mm; margin: auto; }}
h1 {{ font-size: {pt(14)}; margin: 0 0 {mm(2)}; }}
h2 {{ font-size: {pt(11)}; margin: {mm(4)} 0 {mm(1)}; }}
table {{ border-collapse: collapse; width: 100%; font-size: {pt(8.5)}; }}
th, td {{ border-bottom: 1px solid #d8dee4; padding: {mm(1)} {mm(2)}; text-align: left; }}
th {{ background: #eef2f5; }} .withheld {{ color: #8a5a00; font-style: italic; }}
pre {{ white-space: pre-wrap; font-size: {pt(8.5)}; background: #f4f6f8; padding: {mm(2)}; }}
ul {{ margin: {mm(1)} 0; }} .muted {{ color: #5f6b77; }}
"""


#: Type scales the PDF tries, largest first, until the report fits one A4 page.
PDF_SCALES = (1.0, 0.85, 0.72, 0.6)


def report_html(past: PastAnswer, scale: float = 1.0) -> str:
    """A one-page report of a past answer (:func:`report_pdf` lays it out as a PDF)."""
    body = past.body
    given = datetime.fromtimestamp(past.at).astimezone().isoformat(timespec="seconds")
    saved = f", saved question {escape(past.trial)}" if past.trial else ""
    parts = [
        f"<h1>{escape(past.title or 'Feasibility answer')}</h1>",
        f'<p class="muted">{escape(past.kind)} answer {past.id}, question '
        f"{escape(past.fingerprint)}, given {escape(given)}{saved}</p>",
        "<h2>Criteria</h2>",
        f"<pre>{escape(_criteria_in_words(past))}</pre>",
    ]
    if "total" in body:
        parts.append(f"<h2>Eligible now</h2><p>{_display(body['total'])}</p>")
    funnel = body.get("funnel")
    if isinstance(funnel, list) and funnel:
        fields = ["entered", "passed", "failed", "unknown", "remaining"]
        rows = [
            [escape(str(r.get("label"))), *[_display(r.get(f)) for f in fields]] for r in funnel
        ]
        parts.append("<h2>Funnel</h2>" + _table(["step", *fields], rows))
    sites = body.get("by_site")
    if isinstance(sites, dict) and sites:
        rows = [[escape(s), _display(c)] for s, c in sorted(sites.items())]
        parts.append("<h2>Sites</h2>" + _table(["site", "eligible"], rows))
    ranked = body.get("sites")
    if isinstance(ranked, list) and ranked and isinstance(ranked[0], dict):
        rows = []
        for r in ranked:
            projection = r.get("projection") or {}
            rows.append(
                [
                    escape(str(r.get("rank") or "-")),
                    escape(str(r.get("site"))),
                    _display(r.get("eligible_now")),
                    _display(r.get("new_per_30_days")),
                    _display(r.get("enrolment_rate")),
                    escape(str(projection.get("projected_date") or projection.get("reason") or "")),
                ]
            )
        parts.append(
            "<h2>Site selection</h2>"
            + _table(
                ["rank", "site", "eligible now", "new / 30 days", "enrolment", "target reached"],
                rows,
            )
        )
    forecast = body.get("forecast")
    if isinstance(forecast, dict) and "forecast" in forecast:
        low, high = forecast.get("interval") or [None, None]
        text = (
            f"{forecast.get('projected_date')} (90% interval {low} to {high or 'beyond horizon'})"
            if forecast.get("forecast")
            else str(forecast.get("reason"))
        )
        parts.append(f"<h2>Forecast</h2><p>{escape(text)}</p>")
    other = [
        (path, cell)
        for path, cell in cells({k: v for k, v in body.items() if k in ("profile", "impact")})
    ]
    if other:
        rows = [[escape(" / ".join(path)), _display(cell)] for path, cell in other]
        parts.append("<h2>Details</h2>" + _table(["cell", "shown"], rows))
    rules = body.get("rules") or []
    notes = body.get("notes") or []
    parts.append(
        "<h2>Disclosure rules in force</h2><ul>"
        + "".join(f"<li>{escape(str(r))}</li>" for r in rules)
        + "</ul>"
    )
    if notes:
        parts.append("<ul>" + "".join(f"<li>{escape(str(n))}</li>" for n in notes) + "</ul>")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(past.title or 'answer')}</title>"
        f"<style>{_style(scale)}</style></head><body>" + "".join(parts) + "</body></html>"
    )


def _no_fetch(url: str, *args: Any, **kwargs: Any) -> Any:
    """WeasyPrint's URL fetcher for the report: it fetches nothing (the report is one
    self-contained document, offline; a URL in it would be a defect, not a request to make)."""
    raise ValueError(f"the report fetches nothing ({url[:60]!r})")


def report_pdf(past: PastAnswer) -> bytes:
    """The report of :func:`report_html` as a PDF, laid out by WeasyPrint: the same HTML at the
    largest type scale of :data:`PDF_SCALES` that fits one A4 page (an answer with very many
    sites that does not fit even at the smallest continues on a second page)."""
    # imported here: WeasyPrint loads Pango through cffi at import, which only this export needs
    from weasyprint import HTML

    document = None
    for scale in PDF_SCALES:
        document = HTML(string=report_html(past, scale), url_fetcher=_no_fetch).render()
        if len(document.pages) == 1:
            break
    assert document is not None
    pdf: bytes = document.write_pdf()
    return pdf


__all__ = ["CSV_COLUMNS", "PDF_SCALES", "cells", "report_html", "report_pdf", "to_csv"]
