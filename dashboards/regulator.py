"""The regulator's dashboard: live device-safety signals from ``/v1/surveillance``.

Run it with ``concierge dashboard`` (or ``streamlit run dashboards/regulator.py``). Configuration
is :class:`dashboards.settings.DashboardSettings` (``CONCIERGE_API_URL``,
``CONCIERGE_DASHBOARD_TOKEN``, ``CONCIERGE_DASHBOARD_REFRESH_SECONDS``, ``_ROWS``); a wrong value
shows as one line on the page instead of the page.

The page has a live part (status and the ranked signal table, then the chosen signal's charts,
statistics, drill-down, provenance and history), each a fragment that reruns on a timer, and a
lifecycle form that reruns only when used, so a half-written reason is never lost to a refresh.

Everything above ``_shared_client`` is pure: it turns API answers into rows, labels and Altair
charts, and unit tests call it without Streamlit. Patient pseudonyms appear only in the provenance
table; nothing here logs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st
from pydantic import ValidationError

from core.contracts.signals import SignalEvent
from core.settings import describe
from dashboards.client import (
    BREAKDOWNS,
    LEVELS,
    STATES,
    Action,
    ApiError,
    BreakdownBy,
    BreakdownRow,
    HistoryPoint,
    Level,
    ScanCut,
    ScanView,
    Signal,
    Source,
    State,
    Status,
    SurveillanceApi,
    SurveillanceClient,
)
from dashboards.settings import DashboardSettings

#: Session-state key under which a client may be injected (unit tests put a fake there).
CLIENT_KEY = "surveillance_client"
#: The selected signal's widget key, also its query parameter (``?signal=sig-...``).
SIGNAL_KEY = "signal"

DASH = "—"
#: Marks a row whose statistical rule fires now.
FIRES = "▲ fires"
SIGNALLING_ROW_STYLE = "background-color: #fde2e1; font-weight: 600"
ACTION_LABELS: dict[str, str] = {
    "review": "Start review",
    "confirm": "Confirm",
    "dismiss": "Dismiss",
    "close": "Close",
    "reopen": "Reopen",
}


# --------------------------------------------------------------------------- formatting


def fmt_number(value: float | int | None, digits: int = 2) -> str:
    """A statistic for a table: a dash when missing or not finite."""
    if value is None or isinstance(value, bool):
        return DASH
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return DASH
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 10 ** (-digits):
        # never scientific notation (6.6e-05 reads as 6.6 at a glance): enough decimals for
        # ``digits`` significant figures
        places = -math.floor(math.log10(abs(value))) + digits - 1
        return f"{value:.{places}f}"
    return f"{value:.{digits}f}"


def _bounds(ci: Sequence[Any] | None) -> tuple[Any, Any]:
    """(lo, hi) of an interval given as a list that may be short or missing."""
    lo, hi, *_ = [*(ci or []), None, None]
    return lo, hi


def fmt_interval(value: float | None, ci: Sequence[float | None] | None, digits: int = 2) -> str:
    """``"3.10 (1.52 to 6.33)"``; an unknown bound shows as a dash."""
    if value is None:
        return DASH
    lo, hi = _bounds(ci)
    return f"{fmt_number(value, digits)} ({fmt_number(lo, digits)} to {fmt_number(hi, digits)})"


def fmt_count(value: int | str | None) -> str:
    """A patient count, or the withheld marker exactly as the API gave it (e.g. ``"<10"``)."""
    if value is None:
        return DASH
    return str(value)


def _thousands(value: int | str) -> str:
    """A count with thousands separators, or a withheld marker as the API gave it."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def fmt_time(value: str | None, clock: bool = False) -> str:
    """An ISO timestamp shortened for reading: ``2026-01-05 14:03:07 UTC`` (``14:03:07 UTC``
    with ``clock``)."""
    if not value:
        return DASH
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    zone = moment.tzname() or ""
    text = moment.strftime("%H:%M:%S" if clock else "%Y-%m-%d %H:%M:%S")
    return f"{text} {'UTC' if zone in ('UTC', 'UTC+00:00') else zone}".strip()


def fmt_state(state: str) -> str:
    """``under_review`` -> ``under review``; ``signalled`` stays ``signalled``."""
    return state.replace("_", " ")


def signal_label(signal: Signal) -> str:
    """How a signal is named in the chooser: node and outcome.

    It must not change while the signal is chosen (so no state in it): Streamlit keeps a
    selectbox's value as the option's label and matches it back on every rerun.
    """
    return f"{signal['node']} · {signal['outcome']}"


def observed_expected(signal: Signal) -> str:
    return f"{signal['observed']} / {fmt_number(signal.get('expected'))}"


def is_signalling(signal: Signal) -> bool:
    """A row to mark: the rule fires now, or the signal is signalled and not yet looked at."""
    return bool(signal.get("signal")) or signal["state"] == "signalled"


def signal_rows(signals: Iterable[Signal]) -> list[dict[str, str]]:
    """The ranked signal table, one row of display strings per signal, in the API's order."""
    rows = []
    for rank, signal in enumerate(signals, start=1):
        rows.append(
            {
                "Rank": str(rank),
                "Rule": FIRES if signal.get("signal") else "",
                "State": fmt_state(signal["state"]),
                "Node": signal["node"],
                "Outcome": signal["outcome"],
                "Observed / expected": observed_expected(signal),
                "Strength": fmt_number(signal.get("strength")),
                "PRR (95% CI)": fmt_interval(signal.get("prr"), signal.get("prr_ci")),
                "EB05": fmt_number(signal.get("eb05")),
                "IC025": fmt_number(signal.get("ic025")),
                "Fired": ", ".join(signal.get("fired") or []) or DASH,
            }
        )
    return rows


def row_styles(signals: Sequence[Signal]) -> list[str]:
    """A CSS style per table row: signalling rows stand out."""
    return [SIGNALLING_ROW_STYLE if is_signalling(signal) else "" for signal in signals]


def status_metrics(status: Status) -> list[tuple[str, str]]:
    """(label, value) pairs for the header."""
    return [
        # patients with a device contribution, not the population (the monitor sees no other)
        ("Patients with an implant", _thousands(status["patients"])),
        ("Contributions applied", f"{status['contributions_applied']:,}"),
        ("Latest data day", status.get("latest_day") or DASH),
        ("Last update", fmt_time(status.get("updated_at"), clock=True)),
    ]


def breakdown_rows(rows: Iterable[BreakdownRow]) -> list[dict[str, str]]:
    return [
        {
            "Key": row["key"],
            "Node": row["node"],
            "Exposed": fmt_count(row.get("exposed")),
            "With outcome": fmt_count(row.get("with_outcome")),
            "PRR (95% CI)": fmt_interval(row.get("prr"), row.get("prr_ci")),
        }
        for row in rows
    ]


def default_breakdown(level: str) -> BreakdownBy:
    """The drill-down a signal opens with: the level below a class or manufacturer; by site for
    a model or lot (a model's lots are mostly too small to show)."""
    return {"class": "manufacturer", "manufacturer": "model"}.get(level, "site")  # type: ignore[return-value]


def split_withheld(rows: Iterable[BreakdownRow]) -> tuple[list[BreakdownRow], list[BreakdownRow]]:
    """Rows with a count to show, and rows whose counts are all withheld."""
    shown: list[BreakdownRow] = []
    withheld: list[BreakdownRow] = []
    for row in rows:
        (withheld if row.get("withheld") else shown).append(row)
    return shown, withheld


def provenance_rows(sources: Iterable[Source]) -> list[dict[str, str]]:
    return [
        {
            "Patient": source["patient"],
            "Role": source["role"],
            "Resource": source["resource"],
            "Type": source.get("resource_type") or DASH,
            "Id": source.get("resource_id") or DASH,
            "Version": fmt_count(source.get("version")),
            "Last updated": fmt_time(source.get("last_updated")),
        }
        for source in sources
    ]


def event_rows(events: Iterable[SignalEvent]) -> list[dict[str, str]]:
    """The lifecycle history, oldest first as the API gives it."""
    rows = []
    for event in events:
        before = event.get("from")
        rows.append(
            {
                "At": fmt_time(event.get("at")),
                "Version": fmt_count(event.get("version")),
                "Action": str(event.get("action") or DASH),
                "From → to": f"{fmt_state(str(before or DASH))} → "
                f"{fmt_state(str(event.get('to') or DASH))}",
                "Actor": str(event.get("actor") or DASH),
                "Reason": str(event.get("reason") or ""),
            }
        )
    return rows


def assessment_metrics(signal: Signal) -> list[tuple[str, str]]:
    """The headline numbers of one signal."""
    return [
        ("Observed", fmt_number(signal.get("observed"))),
        ("Expected (adjusted)", fmt_number(signal.get("expected"))),
        ("Expected (crude)", fmt_number(signal.get("expected_crude"))),
        ("LLR", fmt_number(signal.get("llr"))),
        ("Critical value", fmt_number(signal.get("cv"))),
        ("Strength", fmt_number(signal.get("strength"))),
        ("IC025", fmt_number(signal.get("ic025"))),
        ("EB05", fmt_number(signal.get("eb05"))),
    ]


# --------------------------------------------------------------------------- charts


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def history_frames(points: Sequence[HistoryPoint]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long-form data for the two panels: cumulative counts, and LLR against the boundary."""
    counts: list[dict[str, Any]] = []
    llr: list[dict[str, Any]] = []
    for point in points:
        period = point["period"]
        fires = bool(point.get("signal"))
        counts.append(
            {"period": period, "series": "observed", "value": point["observed"], "signal": fires}
        )
        expected = _finite(point.get("expected"))
        if expected is not None:
            counts.append(
                {"period": period, "series": "expected", "value": expected, "signal": fires}
            )
        value = _finite(point.get("llr"))
        if value is not None:
            llr.append({"period": period, "series": "LLR", "value": value, "signal": fires})
        cv = _finite(point.get("cv"))
        if cv is not None:
            llr.append({"period": period, "series": "critical value", "value": cv, "signal": fires})
    columns = ["period", "series", "value", "signal"]
    return pd.DataFrame(counts, columns=columns), pd.DataFrame(llr, columns=columns)


def observed_expected_panels(
    points: Sequence[HistoryPoint],
) -> tuple[alt.LayerChart, alt.LayerChart]:
    """Cumulative observed vs expected by implant quarter; LLR vs the critical value.

    Periods where the rule fires carry a red triangle on both panels. The page draws the two
    panels one above the other as separate charts, so each fits the column's width.
    """
    counts, llr = history_frames(points)
    periods = [point["period"] for point in points]
    x = alt.X(
        "period:O",
        sort=periods,
        title="Implant quarter (cumulative)",
        axis=alt.Axis(labelAngle=0, labelOverlap=True),
    )
    tooltip = ["period:O", "series:N", alt.Tooltip("value:Q", format=".2f"), "signal:N"]

    count_lines = (
        alt.Chart(counts)
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("value:Q", title="Patients with the outcome"),
            color=alt.Color(
                "series:N",
                scale=alt.Scale(domain=["observed", "expected"], range=["#c0392b", "#7f8c8d"]),
                legend=alt.Legend(orient="top", title=None),
            ),
            strokeDash=alt.StrokeDash(
                "series:N",
                scale=alt.Scale(domain=["observed", "expected"], range=[[1, 0], [6, 4]]),
                legend=None,
            ),
            tooltip=tooltip,
        )
    )
    count_fires = (
        alt.Chart(counts)
        .transform_filter((alt.datum.series == "observed") & alt.datum.signal)
        .mark_point(size=90, filled=True, color="#c0392b", shape="triangle-up")
        .encode(x=x, y="value:Q", tooltip=tooltip)
    )
    top = (count_lines + count_fires).properties(height=340, width="container")

    llr_lines = (
        alt.Chart(llr)
        .mark_line()
        .encode(
            x=x,
            y=alt.Y("value:Q", title="Log-likelihood ratio"),
            color=alt.Color(
                "series:N",
                scale=alt.Scale(domain=["LLR", "critical value"], range=["#2c3e50", "#c0392b"]),
                legend=alt.Legend(orient="top", title=None),
            ),
            strokeDash=alt.StrokeDash(
                "series:N",
                scale=alt.Scale(domain=["LLR", "critical value"], range=[[1, 0], [6, 4]]),
                legend=None,
            ),
            tooltip=tooltip,
        )
    )
    llr_fires = (
        alt.Chart(llr)
        .transform_filter((alt.datum.series == "LLR") & alt.datum.signal)
        .mark_point(size=90, filled=True, color="#c0392b", shape="triangle-up")
        .encode(x=x, y="value:Q", tooltip=tooltip)
    )
    bottom = (llr_lines + llr_fires).properties(
        title="MaxSPRT: LLR vs the signalling boundary", height=280, width="container"
    )
    return top, bottom


def observed_expected_chart(points: Sequence[HistoryPoint]) -> alt.VConcatChart:
    """Both panels of :func:`observed_expected_panels` as one chart."""
    top, bottom = observed_expected_panels(points)
    return alt.vconcat(top, bottom).resolve_scale(color="independent", strokeDash="independent")


def forest_rows(signal: Signal, assessment: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Ratio measures with their intervals, from the assessment where it has them.

    Only positive, finite estimates can sit on a log scale; a missing or non-positive bound is
    drawn at the estimate (an open side) and flagged.
    """
    assessment = assessment or {}
    dp = assessment.get("disproportionality") or {}
    eb = assessment.get("ebgm") or {}
    measures: list[tuple[str, Any, Sequence[Any]]] = [
        ("PRR", dp.get("prr", signal.get("prr")), dp.get("prr_ci", signal.get("prr_ci")) or []),
        ("ROR", dp.get("ror", signal.get("ror")), dp.get("ror_ci", signal.get("ror_ci")) or []),
        (
            "EBGM",
            eb.get("ebgm", signal.get("ebgm")),
            [eb.get("eb05", signal.get("eb05")), eb.get("eb95")],
        ),
    ]
    rows = []
    for name, estimate, ci in measures:
        point = _finite(estimate)
        if point is None or point <= 0:
            continue
        lo, hi = _bounds(ci)
        lo_f, hi_f = _finite(lo), _finite(hi)
        rows.append(
            {
                "measure": name,
                "estimate": point,
                "lo": lo_f if lo_f is not None and lo_f > 0 else point,
                "hi": hi_f if hi_f is not None and hi_f > 0 else point,
                "open": lo_f is None or lo_f <= 0 or hi_f is None or hi_f <= 0,
                "label": fmt_interval(point, [lo_f, hi_f]),
            }
        )
    return pd.DataFrame(rows, columns=["measure", "estimate", "lo", "hi", "open", "label"])


def forest_chart(rows: pd.DataFrame) -> alt.LayerChart:
    """A forest plot on a log scale with a reference line at 1 (no disproportion)."""
    values = [1.0, *rows["lo"].tolist(), *rows["hi"].tolist()]
    domain = [min(values) / 1.5, max(values) * 1.5]
    x_scale = alt.Scale(type="log", domain=domain)
    y = alt.Y("measure:N", title=None, sort=None)
    tooltip = ["measure:N", "label:N", "open:N"]
    reference = (
        alt.Chart(pd.DataFrame({"x": [1.0]}))
        .mark_rule(color="#7f8c8d", strokeDash=[4, 4])
        .encode(x=alt.X("x:Q", scale=x_scale))
    )
    bars = (
        alt.Chart(rows)
        .mark_rule(strokeWidth=2, color="#2c3e50")
        .encode(
            x=alt.X("lo:Q", scale=x_scale, title="Ratio (log scale), 95% interval"),
            x2="hi:Q",
            y=y,
            tooltip=tooltip,
        )
    )
    points = (
        alt.Chart(rows)
        .mark_point(filled=True, size=100, shape="square", color="#c0392b")
        .encode(x=alt.X("estimate:Q", scale=x_scale), y=y, tooltip=tooltip)
    )
    return (reference + bars + points).properties(
        height=100 + 40 * max(len(rows), 1), width="container"
    )


def scan_frame(cuts: Sequence[ScanCut], limit: int = 25) -> pd.DataFrame:
    """The highest cuts of a tree scan, one row each, for the chart."""
    rows = []
    for cut in list(cuts)[:limit]:
        rows.append(
            {
                "cut": f"{cut['node']} · {cut['outcome']}",
                "level": cut["level"],
                "llr": float(cut["llr"]),
                "observed": cut["observed"],
                "expected": fmt_number(cut["expected"]),
                "p": fmt_number(cut["p_value"], 3),
                "signal": "passes" if cut["signal"] else "does not pass",
            }
        )
    columns = ["cut", "level", "llr", "observed", "expected", "p", "signal"]
    return pd.DataFrame(rows, columns=columns)


def scan_chart(frame: pd.DataFrame) -> alt.Chart:
    """The scan statistic over the tree: each cut's log-likelihood ratio (highest first),
    coloured by its level; cuts that pass the look's alpha are outlined."""
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("llr:Q", title="Log-likelihood ratio (conditional Poisson)"),
            y=alt.Y("cut:N", sort="-x", title=None, axis=alt.Axis(labelLimit=420)),
            color=alt.Color(
                "level:N",
                scale=alt.Scale(domain=list(LEVELS)),
                legend=alt.Legend(orient="top", title="level"),
            ),
            stroke=alt.Stroke(
                "signal:N",
                scale=alt.Scale(domain=["passes", "does not pass"], range=["#c0392b", "#ffffff"]),
                legend=alt.Legend(orient="top", title="family-wise control"),
            ),
            strokeWidth=alt.value(2),
            tooltip=[
                "cut:N",
                "level:N",
                alt.Tooltip("llr:Q", format=".3f"),
                "observed:Q",
                "expected:N",
                "p:N",
                "signal:N",
            ],
        )
        .properties(height=24 * max(len(frame), 1) + 40, width="container")
    )


def look_rows(view: ScanView) -> list[dict[str, str]]:
    return [
        {
            "Look": fmt_count(look.get("look")),
            "Data day": str(look.get("data_day") or DASH),
            "Alpha at the look": fmt_number(look.get("alpha"), 2),
            "Alpha spent": fmt_number(look.get("alpha_spent"), 2),
            "Signals": fmt_count(look.get("signals")),
            "Replications": fmt_count(look.get("replications")),
        }
        for look in view.get("looks", [])
    ]


# --------------------------------------------------------------------------- the page


@st.cache_resource(show_spinner=False)
def _shared_client(api_url: str, token: str | None) -> SurveillanceApi:
    """One HTTP client (and connection pool) for all browser sessions of this server."""
    return SurveillanceClient(api_url, token, timeout=10.0)


def _client(config: DashboardSettings) -> SurveillanceApi:
    injected = st.session_state.get(CLIENT_KEY)
    if injected is not None:
        return injected
    token = config.token.get_secret_value() if config.token is not None else None
    return _shared_client(config.api, token)


def _styled_signal_table(signals: Sequence[Signal]) -> Any:
    frame = pd.DataFrame(signal_rows(signals))
    styles = row_styles(signals)
    return frame.style.apply(lambda row: [styles[row.name]] * len(row), axis=1).hide(axis="index")


def _metric_help(label: str, status: Status) -> str | None:
    if label == "Last update":
        return f"The stream's state was last updated {fmt_time(status.get('updated_at'))}."
    if label == "Latest data day":
        return "The latest day of data the stream has applied."
    return None


def _live_signals(
    client: SurveillanceApi,
    level: Level,
    state: State | None,
    only_firing: bool,
    shown: str | None,
    limit: int = 15,
) -> None:
    try:
        status = client.status()
        listing = client.signals(level=level, state=state)
    except ApiError as exc:
        st.error(f"Cannot read the regulator API: {exc}")
        return
    with st.container(key="status"):
        metrics = status_metrics(status)
        for column, (label, value) in zip(st.columns(len(metrics)), metrics, strict=True):
            column.metric(label, value, help=_metric_help(label, status))
        if not status.get("ready"):
            st.warning("The surveillance stream is still catching up; numbers will move.")

    signals = listing["signals"]
    if only_firing:
        signals = [signal for signal in signals if is_signalling(signal)]
    firing = sum(1 for signal in signals if signal.get("signal"))
    ranked = len(signals)
    signals = signals[:limit]  # the strongest first; the rest are one setting away
    st.subheader(f"Signals at {level} level")
    st.caption(
        f"As of data day {listing.get('at') or DASH}, "
        f"computed {fmt_time(listing.get('generated_at'))}; "
        f"ranked by strength (LLR / critical value, ≥ 1 is at the boundary). "
        f"{len(signals)} of {ranked} shown, {firing} where the rule fires ({FIRES}); signalling "
        "rows are highlighted."
    )
    labels: dict[str, str] = st.session_state.setdefault("signal_labels", {})
    labels.update({signal["id"]: signal_label(signal) for signal in signals})
    if shown and shown not in labels:  # chosen by a link, not in this list
        with contextlib.suppress(ApiError):  # the detail view says why
            labels[shown] = signal_label(client.signal(shown)["signal"])
    current = shown
    by_label = {label: signal_id for signal_id, label in labels.items()}
    if shown in by_label and shown not in labels:  # a label came back as the value: mend it
        st.session_state[SIGNAL_KEY] = current = by_label[shown]  # the page reruns below
    with st.container(key="signal-table"):
        if signals:
            st.table(_styled_signal_table(signals))
        else:
            st.info("No signals at this level and state.")

    options = [signal["id"] for signal in signals]
    if current and current not in options:  # keep the chosen signal when it leaves the list
        options.append(current)
    st.selectbox(
        "Inspect a signal",
        options,
        index=None,
        key=SIGNAL_KEY,
        format_func=lambda signal_id: labels.get(signal_id, signal_id),
        placeholder="Choose a signal to see its detail",
    )
    chosen = st.session_state.get(SIGNAL_KEY)
    if chosen != shown:
        # The URL names the signal by id (``bind="query-params"`` would use the label, which
        # changes with the state), so a link opens the same signal.
        if chosen:
            st.query_params[SIGNAL_KEY] = chosen
        else:
            st.query_params.pop(SIGNAL_KEY, None)
        st.rerun(scope="app")  # the detail below belongs to the whole page, not this fragment


def _actions_key(signal: Signal) -> tuple[str, str, tuple[str, ...]]:
    """What the lifecycle form was drawn for; when it changes, the form is redrawn."""
    return signal["id"], signal["state"], tuple(sorted(signal.get("allowed_actions") or []))


def _lifecycle_actions(client: SurveillanceApi, signal_id: str) -> None:
    """The lifecycle form; reruns only when used (a refresh must not eat a half-typed reason)."""
    flash = st.session_state.pop("lifecycle_flash", None)
    if flash:
        st.success(flash)
    st.session_state["lifecycle_shown"] = None
    try:
        signal = client.signal(signal_id)["signal"]
    except ApiError as exc:
        st.error(str(exc))
        return
    allowed: list[Action] = list(signal.get("allowed_actions") or [])
    st.session_state["lifecycle_shown"] = _actions_key(signal)
    generation = st.session_state.setdefault("lifecycle_generation", 0)
    clicked: Action | None = None
    with st.form(key=f"lifecycle-{signal_id}", border=True):
        st.markdown(f"**Lifecycle** · state: **{fmt_state(signal['state'])}**")
        reason = st.text_area(
            "Reason (kept in the signal's history)", key=f"reason-{signal_id}-{generation}"
        )
        with st.container(horizontal=True):
            for action in allowed:
                if st.form_submit_button(ACTION_LABELS.get(action, action), key=f"action-{action}"):
                    clicked = action
            if not allowed:  # a form needs a submit button
                st.form_submit_button("No actions allowed in this state", disabled=True)
    if clicked is None:
        return
    if not (reason or "").strip():
        st.error(f"Give a reason before you {clicked}: it is kept in the signal's history.")
        return
    try:
        after = client.act(signal_id, clicked, reason.strip())["signal"]
    except ApiError as exc:
        st.error(f"{ACTION_LABELS.get(clicked, clicked)} was refused: {exc}")
        return
    st.session_state["lifecycle_flash"] = (
        f"{ACTION_LABELS.get(clicked, clicked)}: {after['node']} · {after['outcome']} is now "
        f"{fmt_state(after['state'])}."
    )
    st.session_state["lifecycle_generation"] = generation + 1
    st.rerun(scope="app")


def _live_detail(client: SurveillanceApi, signal_id: str) -> None:
    try:
        detail = client.signal(signal_id)
        history = client.history(signal_id)
        provenance = client.provenance(signal_id, limit=100)
    except ApiError as exc:
        st.error(f"Could not read signal {signal_id}: {exc}")
        return
    signal = detail["signal"]
    shown = st.session_state.get("lifecycle_shown")
    if shown is not None and shown != _actions_key(signal):
        st.rerun(scope="app")  # the state moved: redraw the lifecycle form's buttons

    with st.container(key="signal-detail"):
        st.subheader(f"{signal['node']} · {signal['outcome']}")
        st.caption(
            f"{signal['level']} level, device class {signal['device_class']} · "
            f"state {fmt_state(signal['state'])} · "
            + (
                f"the rule fires ({', '.join(signal.get('fired') or [])})"
                if signal.get("signal")
                else "the rule does not fire now"
            )
            + f" · updated {fmt_time(signal.get('updated_at'))} · id {signal['id']}"
        )
        metrics = assessment_metrics(signal)
        for column, (label, value) in zip(st.columns(len(metrics)), metrics, strict=True):
            column.metric(label, value)

    left, right = st.columns([3, 2])
    with left, st.container(key="observed-expected"):
        st.markdown("**Observed vs expected over time**")
        if history["points"]:
            for panel in observed_expected_panels(history["points"]):
                st.altair_chart(panel, width="stretch")
        else:
            st.info("No history yet.")
    with right, st.container(key="disproportionality"):
        st.markdown("**Disproportionality with 95% intervals**")
        forest = forest_rows(signal, detail.get("assessment"))
        if len(forest):
            st.altair_chart(forest_chart(forest), width="stretch")
        else:
            st.info("No ratio can be estimated yet (a zero cell).")
        table = signal["table"]
        st.table(
            pd.DataFrame(
                {
                    "": ["this node", "the rest of the class"],
                    "with outcome": [table["a"], table["c"]],
                    "without": [table["b"], table["d"]],
                }
            ).set_index("")
        )

    st.markdown("**Reproduce these statistics**")
    for name, command in (detail.get("reproduce") or {}).items():
        st.caption(name)
        st.code(command, language="bash", wrap_lines=True)
    with st.expander("Full statistics"):
        st.json(detail.get("assessment") or {}, expanded=2)

    st.markdown("**Drill-down**")
    first = default_breakdown(signal["level"])
    by: BreakdownBy = (
        st.segmented_control(
            "Break down by",
            BREAKDOWNS,
            default=first,
            key=f"breakdown-{signal_id}",
            required=True,
        )
        or first
    )
    try:
        breakdown = client.breakdown(signal_id, by)
    except ApiError as exc:
        st.error(str(exc))
    else:
        shown, withheld = split_withheld(breakdown["rows"])
        if shown:
            st.table(pd.DataFrame(breakdown_rows(shown)).set_index("Key"))
        if withheld:
            st.caption(
                f"{len(withheld)} {by} rows with counts below the small-number threshold are not "
                "listed (the API withholds their counts)."
            )
        if not breakdown["rows"]:
            st.info(f"Nothing to break down by {by}.")

    st.markdown("**Lifecycle history**")
    if detail["events"]:
        st.table(pd.DataFrame(event_rows(detail["events"])).set_index("At"))
    else:
        st.caption("No lifecycle events yet.")

    st.markdown(f"**Provenance** ({provenance['count']} source resources; first 100)")
    if provenance["sources"]:
        st.dataframe(pd.DataFrame(provenance_rows(provenance["sources"])), hide_index=True)
    else:
        st.caption("No source resources recorded.")


def _tree_scan(client: SurveillanceApi) -> None:
    """The tree-based scan: the latest scan's highest cuts as a chart, and the looks so far."""
    try:
        view = client.scan()
    except ApiError as exc:
        st.error(f"Cannot read the tree scan: {exc}")
        return
    with st.container(key="tree-scan"):
        st.subheader("Tree-based scan over the device hierarchy")
        plan = view["plan"]
        latest = view.get("latest")
        spent = view["looks"][-1]["alpha_spent"] if view["looks"] else 0.0
        st.caption(
            f"Conditional Poisson scan of every node and outcome at once, Monte Carlo p-values; "
            f"alpha {fmt_number(plan.get('alpha'))} spent over {plan.get('looks')} looks "
            f"(every {plan.get('every_days')} days of data): {len(view['looks'])} looks so far, "
            f"{fmt_number(spent, 2)} spent."
        )
        if latest is None:
            st.info("No scan yet: the first look runs once the monitor has data.")
            return
        where = f"look {latest['look']}" if latest.get("look") else "exploratory scan"
        st.markdown(
            f"**Latest: {where}**, data day {latest.get('data_day') or DASH}, alpha at the look "
            f"{fmt_number(latest.get('alpha'), 2)}; {len(latest.get('signals') or [])} cuts pass."
        )
        frame = scan_frame(latest.get("top") or [])
        if len(frame):
            st.altair_chart(scan_chart(frame), width="stretch")
        rows = look_rows(view)
        if rows:
            st.table(pd.DataFrame(rows).set_index("Look"))


def main() -> None:
    st.set_page_config(page_title="Device-safety signals", layout="wide")
    try:
        config = DashboardSettings()
    except ValidationError as exc:
        st.error(describe(exc, [DashboardSettings]))
        st.stop()
    client = _client(config)
    st.title("Device-safety signals")
    st.caption(f"Regulator view of {config.api}; live, every {config.refresh_seconds:g} s.")
    with st.sidebar:
        level: Level = st.selectbox("Level", LEVELS, index=LEVELS.index("model"), key="level")
        state_choice = st.selectbox(
            "State", ("any", *STATES), format_func=fmt_state, key="state_filter"
        )
        only_firing = st.toggle("Only signalling rows", key="only_signalling")
        limit = int(
            st.number_input(
                "Rows shown", min_value=5, max_value=1000, value=config.rows, step=5, key="rows"
            )
        )
    state: State | None = None if state_choice == "any" else state_choice  # type: ignore[assignment]

    every = config.refresh_seconds
    if SIGNAL_KEY not in st.session_state and st.query_params.get(SIGNAL_KEY):
        st.session_state[SIGNAL_KEY] = st.query_params[SIGNAL_KEY]  # a shared link
    shown: str | None = st.session_state.get(SIGNAL_KEY)
    st.fragment(_live_signals, run_every=every)(client, level, state, only_firing, shown, limit)
    shown = st.session_state.get(SIGNAL_KEY)
    st.fragment(_tree_scan, run_every=max(every, 10.0))(client)
    if not shown:
        st.info("Choose a signal above to see observed vs expected, intervals and provenance.")
        return
    st.divider()
    st.fragment(_lifecycle_actions)(client, shown)
    st.fragment(_live_detail, run_every=every)(client, shown)


if __name__ == "__main__":
    main()
