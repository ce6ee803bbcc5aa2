"""A signal report a regulator can file: HTML (Jinja2, charts as inline SVG) and PDF (ReportLab,
pure Python, no system libraries), both from one :class:`ReportData` gathered from the monitor.

Every number in a report is formatted by :func:`fmt` from the same values the API returns
(``GET /v1/surveillance/signals/{id}`` and ``/history``), so the report and the API agree to the
digits shown. The report carries no pseudonym: provenance is summarised as counts of patients and
of source resources by type (the list itself stays behind the audited provenance route).
"""

from __future__ import annotations

import html
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, select_autoescape

__all__ = ["ReportData", "fmt", "render_html", "render_pdf"]

DASH = "—"


def fmt(value: Any, digits: int = 4) -> str:
    """A number as a report shows it: integers as they are, other numbers to ``digits``
    significant figures in plain (never scientific) notation; missing as a dash."""
    if value is None or isinstance(value, bool):
        return DASH if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return DASH
        if value == 0:
            return "0"
        places = max(0, digits - 1 - math.floor(math.log10(abs(value))))
        return f"{value:.{min(places, 12)}f}"
    return str(value)


@dataclass(frozen=True)
class ReportData:
    """What a report shows, as the API gives it."""

    detail: Mapping[str, Any]  # GET /signals/{id}
    history: Mapping[str, Any]  # GET /signals/{id}/history
    provenance: Mapping[str, Any]  # the monitor's provenance (summarised, never listed)
    scan: Mapping[str, Any] | None  # the latest look of the tree scan, if any
    generated_at: str
    base_url: str = ""

    @property
    def signal(self) -> Mapping[str, Any]:
        return self.detail["signal"]

    @property
    def assessment(self) -> Mapping[str, Any]:
        return self.detail.get("assessment") or {}

    def headline(self) -> list[tuple[str, str]]:
        """The numbers a reader checks first, labelled."""
        found = self.assessment
        maxsprt = found.get("maxsprt") or {}
        table = found.get("table") or {}
        rows = [
            ("State", str(self.signal.get("state", DASH)).replace("_", " ")),
            ("Sequential test", str(found.get("method", "poisson"))),
            ("Observed (a)", fmt(table.get("a"))),
            ("Expected, adjusted", fmt(maxsprt.get("expected"))),
            ("Expected, crude", fmt(maxsprt.get("expected_crude"))),
            ("Poisson MaxSPRT LLR", fmt(maxsprt.get("llr"))),
            ("Critical value", fmt(maxsprt.get("cv"))),
            ("Alpha (attained)", fmt(maxsprt.get("alpha_attained"))),
        ]
        binomial = found.get("binomial")
        if binomial:
            rows += [
                ("Binomial cases / controls", f"{binomial['cases']} / {binomial['controls']}"),
                ("Binomial LLR", fmt(binomial.get("llr"))),
                ("Binomial critical value (CV.Binomial)", fmt(binomial.get("cv"))),
            ]
        cusum = found.get("cusum")
        if cusum:
            rows += [
                ("CUSUM score", fmt(cusum.get("score"))),
                ("CUSUM threshold h", fmt(cusum.get("threshold"))),
            ]
        return rows

    def table(self) -> list[list[str]]:
        found = self.assessment.get("table") or {}
        return [
            ["", "with the outcome", "without"],
            ["this node", fmt(found.get("a")), fmt(found.get("b"))],
            [str(self.assessment.get("comparator", "comparator")), fmt(found.get("c")),
             fmt(found.get("d"))],
        ]  # fmt: skip

    def measures(self) -> list[list[str]]:
        dp = self.assessment.get("disproportionality") or {}
        eb = self.assessment.get("ebgm") or {}
        adjusted_ic = self.assessment.get("adjusted_ic") or {}

        def interval(ci: Sequence[Any] | None) -> str:
            lo, hi, *_ = [*(ci or []), None, None]
            return f"{fmt(lo)} to {fmt(hi)}"

        return [
            ["measure", "estimate", "interval"],
            ["PRR", fmt(dp.get("prr")), interval(dp.get("prr_ci"))],
            ["ROR", fmt(dp.get("ror")), interval(dp.get("ror_ci"))],
            ["chi-squared (Yates)", fmt(dp.get("chi2_yates")), ""],
            ["IC (crude expectation)", fmt(dp.get("ic")), interval([dp.get("ic025"),
                                                                     dp.get("ic975")])],
            ["IC (stratified expectation)", fmt(adjusted_ic.get("ic")),
             interval([adjusted_ic.get("ic025"), adjusted_ic.get("ic975")])],
            ["EBGM (stratified expectation)", fmt(eb.get("ebgm")),
             interval([eb.get("eb05"), eb.get("eb95")])],
        ]  # fmt: skip

    def strata(self) -> list[list[str]]:
        adjustment = self.assessment.get("adjustment") or {}
        by = adjustment.get("by") or []
        rows = [[*by, "observed", "person-days", "comparator rate / day", "expected"]]
        for stratum in adjustment.get("strata") or []:
            label = [str(stratum["stratum"].get(part, "")) for part in by]
            rows.append(
                [*label, fmt(stratum.get("observed")), fmt(stratum.get("person_days")),
                 fmt(stratum.get("comparator_rate")), fmt(stratum.get("expected"))]
            )  # fmt: skip
        return rows

    def adjustment_text(self) -> str:
        adjustment = self.assessment.get("adjustment") or {}
        by = adjustment.get("by") or []
        if not by:
            return "Expected counts are crude (no standardisation configured)."
        unmatched = adjustment.get("unmatched_person_days") or 0
        text = (
            "Expected counts are standardised indirectly over "
            + ", ".join(by)
            + ": the comparator's outcome rate in each stratum times this node's person-days "
            "in it. Adjusted expected "
            + fmt(adjustment.get("expected"))
            + "; crude "
            + fmt(adjustment.get("expected_crude"))
            + "."
        )
        if unmatched:
            text += f" {unmatched} person-days fall in strata the comparator lacks (crude rate)."
        return text

    def multiplicity(self) -> list[str]:
        lines = []
        for control in self.assessment.get("controls") or []:
            if control.get("control") == "tree_scan":
                lines.append(
                    f"Passed the tree-based scan (conditional Poisson) at look {control['look']}: "
                    f"p = {fmt(control.get('p_value'))} against the look's alpha "
                    f"{fmt(control.get('alpha_at_look'))} ({fmt(control.get('alpha_spent'))} of "
                    f"{fmt(control.get('alpha'))} spent), {control.get('replications')} "
                    "Monte Carlo replications."
                )
            else:
                lines.append(
                    "Per-pair rule (" + ", ".join(control.get("rules") or []) + ") at alpha "
                    f"{fmt(control.get('alpha'))}: not adjusted for the number of (node, "
                    "outcome) pairs or of looks."
                )
        if not lines:
            lines.append("The signal rule does not fire now: no control was passed.")
        scan = self.scan
        if scan:
            node = self.signal.get("node")
            outcome = self.signal.get("outcome")
            cut = next(
                (c for c in scan.get("top", []) if c.get("node") == node
                 and c.get("outcome") == outcome),
                None,
            )  # fmt: skip
            look = scan.get("look")
            where = f"look {look}" if look else "an exploratory scan (no alpha spent)"
            if cut is not None:
                lines.append(
                    f"Latest tree scan ({where}, data day {scan.get('data_day')}): this cut has "
                    f"LLR {fmt(cut.get('llr'))}, observed {fmt(cut.get('observed'))} vs expected "
                    f"{fmt(cut.get('expected'))}, p {fmt(cut.get('p_value'))} against alpha "
                    f"{fmt(scan.get('alpha'))}."
                )
            else:
                lines.append(
                    f"Latest tree scan ({where}): this cut is not among the "
                    f"{len(scan.get('top', []))} highest."
                )
        return lines

    def provenance_patients(self) -> set[str]:
        """The pseudonyms behind the count (for checking that none is shown)."""
        return {str(s.get("patient")) for s in self.provenance.get("sources", [])}

    def provenance_summary(self) -> list[list[str]]:
        types = Counter(str(s.get("resource_type") or "unknown") for s in
                        self.provenance.get("sources", []))  # fmt: skip
        rows = [["resource type", "source resource versions"]]
        rows += [[name, str(count)] for name, count in sorted(types.items())]
        return rows

    def provenance_text(self) -> str:
        found = self.provenance
        more = " (summary of the first ones; the list is longer)" if found.get("truncated") else ""
        return (
            f"{found.get('patients', 0)} patients counted in the outcome, "
            f"{found.get('count', 0)} source resource versions behind them{more}. The "
            "pseudonymised list is at the audited provenance route."
        )

    def lifecycle(self) -> list[list[str]]:
        rows = [["at", "version", "action", "from → to", "actor", "reason"]]
        for event in self.detail.get("events") or []:
            rows.append(
                [str(event.get("at", "")), str(event.get("version", "")),
                 str(event.get("action", "")),
                 f"{event.get('from', '')} → {event.get('to', '')}",
                 str(event.get("actor", "")), str(event.get("reason", ""))]
            )  # fmt: skip
        return rows

    def reproduce(self) -> list[tuple[str, str]]:
        return sorted((self.detail.get("reproduce") or {}).items())

    def points(self) -> list[Mapping[str, Any]]:
        return list(self.history.get("points") or [])


# --------------------------------------------------------------------------- HTML


def _svg_lines(
    points: Sequence[Mapping[str, Any]],
    series: Sequence[tuple[str, str, str]],
    title: str,
    width: int = 640,
    height: int = 220,
) -> str:
    """A line chart as inline SVG: ``series`` is ``(key, label, colour)``."""
    pad_left, pad_bottom, pad_top = 48, 28, 24
    values = [
        float(p[key]) for p in points for key, _, _ in series
        if isinstance(p.get(key), int | float) and math.isfinite(float(p[key]))
    ]  # fmt: skip
    top = max(values, default=1.0) or 1.0
    n = max(len(points) - 1, 1)

    def x(i: int) -> float:
        return pad_left + (width - pad_left - 10) * i / n

    def y(v: float) -> float:
        return height - pad_bottom - (height - pad_bottom - pad_top) * v / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad_left}" y="14" font-size="12">{html.escape(title)}</text>',
        f'<line x1="{pad_left}" y1="{y(0)}" x2="{width - 10}" y2="{y(0)}" stroke="#999"/>',
        f'<text x="4" y="{y(top) + 4}" font-size="10">{fmt(top, 3)}</text>',
        f'<text x="4" y="{y(0)}" font-size="10">0</text>',
    ]
    step = max(1, len(points) // 6)
    last = len(points) - 1
    for i, point in enumerate(points):
        # every step-th quarter, and the last one unless it would overprint its neighbour
        if i % step == 0 or (i == last and last % step >= max(1, step // 2)):
            parts.append(
                f'<text x="{x(i) - 14}" y="{height - 8}" font-size="10">'
                f"{html.escape(str(point.get('period', '')))}</text>"
            )
    legend_x = width - 200
    for k, (key, label, colour) in enumerate(series):
        coords = [
            f"{x(i):.1f},{y(float(p[key])):.1f}" for i, p in enumerate(points)
            if isinstance(p.get(key), int | float) and math.isfinite(float(p[key]))
        ]  # fmt: skip
        if coords:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                f'points="{" ".join(coords)}" data-series="{html.escape(key)}"/>'
            )
        parts.append(
            f'<text x="{legend_x}" y="{14 + 12 * k}" font-size="10" fill="{colour}">'
            f"{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Signal report: {{ signal.node }} · {{ signal.outcome }}</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code { display: block; white-space: pre-wrap; word-break: break-all; background: #f6f6f6;
       padding: 0.4em; margin-bottom: 0.5em; }
.state { font-weight: bold; }
</style></head>
<body>
<h1>Device-safety signal report</h1>
<p id="signal-title"><strong>{{ signal.node }}</strong> · {{ signal.outcome }}
 (signal <span id="signal-id">{{ signal.id }}</span>, version {{ signal.version }})</p>
<p>Data day {{ assessment.at }}; generated {{ generated_at }}.</p>
<h2>Statistics</h2>
<table id="headline">{% for label, value in headline %}
<tr><th>{{ label }}</th><td data-label="{{ label }}">{{ value }}</td></tr>{% endfor %}
</table>
<h3>Exposures (2x2 table)</h3>
<table id="two-by-two">{% for row in table %}<tr>{% for cell in row %}
{% if loop.first or loop.index0 == 0 %}<th>{{ cell }}</th>{% else %}<td>{{ cell }}</td>{% endif %}
{% endfor %}</tr>{% endfor %}</table>
<h3>Disproportionality</h3>
<table id="measures">{% for row in measures %}<tr>{% for cell in row %}
<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Observed and expected over time</h2>
<div id="chart-observed-expected">{{ chart_counts | safe }}</div>
<div id="chart-llr">{{ chart_llr | safe }}</div>
<h2>Adjustment</h2>
<p id="adjustment">{{ adjustment_text }}</p>
<table id="strata">{% for row in strata %}<tr>{% for cell in row %}
<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Multiplicity</h2>
<ul id="multiplicity">{% for line in multiplicity %}<li>{{ line }}</li>{% endfor %}</ul>
<h2>Provenance</h2>
<p id="provenance">{{ provenance_text }}</p>
<table>{% for row in provenance_rows %}<tr>{% for cell in row %}
<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Lifecycle</h2>
<table id="lifecycle">{% for row in lifecycle %}<tr>{% for cell in row %}
<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Reproduce</h2>
{% for name, command in reproduce %}<p>{{ name }}</p><code>{{ command }}</code>{% endfor %}
</body></html>
"""

_ENVIRONMENT = Environment(autoescape=select_autoescape(default=True, default_for_string=True))


def render_html(data: ReportData) -> str:
    points = data.points()
    counts = _svg_lines(
        points,
        [("observed", "observed", "#c0392b"), ("expected", "expected (adjusted)", "#2c3e50"),
         ("expected_crude", "expected (crude)", "#95a5a6")],
        "Cumulative outcomes by implant quarter",
    )  # fmt: skip
    llr = _svg_lines(
        points,
        [("llr", "LLR", "#2c3e50"), ("cv", "critical value", "#c0392b")],
        "MaxSPRT log-likelihood ratio against its critical value",
    )
    return _ENVIRONMENT.from_string(_TEMPLATE).render(
        signal=data.signal,
        assessment=data.assessment,
        generated_at=data.generated_at,
        headline=data.headline(),
        table=data.table(),
        measures=data.measures(),
        chart_counts=counts,
        chart_llr=llr,
        adjustment_text=data.adjustment_text(),
        strata=data.strata(),
        multiplicity=data.multiplicity(),
        provenance_text=data.provenance_text(),
        provenance_rows=data.provenance_summary(),
        lifecycle=data.lifecycle(),
        reproduce=data.reproduce(),
    )


# --------------------------------------------------------------------------- PDF


def _line_chart(
    points: Sequence[Mapping[str, Any]], series: Sequence[tuple[str, str, str]], title: str
) -> Any:
    from reportlab.graphics.charts.legends import Legend
    from reportlab.graphics.charts.lineplots import LinePlot
    from reportlab.graphics.shapes import Drawing, String
    from reportlab.lib import colors

    drawing = Drawing(480, 200)
    drawing.add(String(0, 188, title, fontSize=9))
    plot = LinePlot()
    plot.x, plot.y, plot.width, plot.height = 40, 30, 300, 140
    data = []
    used = []
    for key, label, colour in series:
        line = [
            (float(i), float(p[key])) for i, p in enumerate(points)
            if isinstance(p.get(key), int | float) and math.isfinite(float(p[key]))
        ]  # fmt: skip
        if line:
            data.append(line)
            used.append((label, colour))
    if not data:
        drawing.add(String(40, 100, "no history yet", fontSize=9))
        return drawing
    plot.data = data
    for i, (_, colour) in enumerate(used):
        plot.lines[i].strokeColor = colors.HexColor(colour)
        plot.lines[i].strokeWidth = 1.5
    plot.xValueAxis.valueMin = 0
    plot.xValueAxis.valueMax = max(len(points) - 1, 1)
    plot.xValueAxis.labelTextFormat = lambda v: (
        str(points[int(v)].get("period", "")) if 0 <= int(v) < len(points) else ""
    )
    plot.xValueAxis.valueStep = max(1, len(points) // 5)
    plot.xValueAxis.labels.fontSize = 7
    plot.yValueAxis.labels.fontSize = 7
    plot.yValueAxis.valueMin = 0
    drawing.add(plot)
    legend = Legend()
    legend.x, legend.y = 360, 160
    legend.fontSize = 7
    legend.colorNamePairs = [(colors.HexColor(c), label) for label, c in used]
    drawing.add(legend)
    return drawing


def render_pdf(data: ReportData) -> bytes:
    """The report as a PDF (A4)."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    body = styles["BodyText"]
    small = styles["BodyText"].clone("small", fontSize=7, leading=8.5)
    code = styles["Code"].clone("code", fontSize=6.5, leading=8, wordWrap="CJK")
    buffer = io.BytesIO()
    document = SimpleDocTemplate(
        buffer, pagesize=A4, leftMargin=1.6 * cm, rightMargin=1.6 * cm, topMargin=1.5 * cm,
        bottomMargin=1.5 * cm, title=f"Signal report {data.signal.get('id')}",
    )  # fmt: skip

    def table(rows: Sequence[Sequence[str]], header: bool = True) -> Table:
        cells = [[Paragraph(html.escape(str(c)), small) for c in row] for row in rows]
        found = Table(cells, hAlign="LEFT", repeatRows=1 if header else 0)
        style = [("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                 ("VALIGN", (0, 0), (-1, -1), "TOP")]  # fmt: skip
        if header:
            style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")))
        found.setStyle(TableStyle(style))
        return found

    def esc(text: str) -> str:
        return html.escape(text)

    signal = data.signal
    story: list[Any] = [
        Paragraph("Device-safety signal report", styles["Title"]),
        Paragraph(
            f"<b>{esc(str(signal.get('node')))}</b> · {esc(str(signal.get('outcome')))} "
            f"(signal {esc(str(signal.get('id')))}, version {signal.get('version')})",
            body,
        ),
        Paragraph(
            f"Data day {esc(str(data.assessment.get('at')))}; generated {esc(data.generated_at)}.",
            body,
        ),
        Paragraph("Statistics", styles["Heading2"]),
        table([[label, value] for label, value in data.headline()], header=False),
        Spacer(1, 6),
        Paragraph("Exposures (2x2 table)", styles["Heading3"]),
        table(data.table()),
        Paragraph("Disproportionality", styles["Heading3"]),
        table(data.measures()),
        Paragraph("Observed and expected over time", styles["Heading2"]),
        _line_chart(
            data.points(),
            [
                ("observed", "observed", "#c0392b"),
                ("expected", "expected (adjusted)", "#2c3e50"),
                ("expected_crude", "expected (crude)", "#95a5a6"),
            ],
            "Cumulative outcomes by implant quarter",
        ),
        _line_chart(
            data.points(),
            [("llr", "LLR", "#2c3e50"), ("cv", "critical value", "#c0392b")],
            "MaxSPRT log-likelihood ratio against its critical value",
        ),
        Paragraph("Adjustment", styles["Heading2"]),
        Paragraph(esc(data.adjustment_text()), body),
        table(data.strata()),
        Paragraph("Multiplicity", styles["Heading2"]),
        *[Paragraph(esc(line), body) for line in data.multiplicity()],
        Paragraph("Provenance", styles["Heading2"]),
        Paragraph(esc(data.provenance_text()), body),
        table(data.provenance_summary()),
        Paragraph("Lifecycle", styles["Heading2"]),
        table(data.lifecycle()),
        Paragraph("Reproduce", styles["Heading2"]),
    ]
    for name, command in data.reproduce():
        story.append(Paragraph(esc(name), small))
        story.append(Paragraph(esc(command), code))
    document.build(story)
    return buffer.getvalue()
