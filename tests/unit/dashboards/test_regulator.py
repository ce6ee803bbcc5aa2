"""The regulator's dashboard: its formatting and charts, its HTTP client, the page itself
(Streamlit's ``AppTest`` with an in-memory API), and ``concierge dashboard``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from streamlit.testing.v1 import AppTest

from concierge.commands import dashboard as dashboard_cli
from core.auth import verify
from core.settings import describe, get_settings
from dashboards import regulator
from dashboards.client import (
    Action,
    ActionResult,
    ApiAuthError,
    ApiProblem,
    ApiUnreachable,
    Breakdown,
    BreakdownBy,
    History,
    HistoryPoint,
    Level,
    Provenance,
    ScanView,
    Signal,
    SignalDetail,
    SignalList,
    State,
    Status,
    SurveillanceClient,
)
from dashboards.settings import DashboardSettings

FAULTY = "hip/Orthomedica/Acetabulon X2"
OUTCOME = "hip_revision_1y"

ALLOWED: dict[str, list[str]] = {
    "none": [],
    "signalled": ["review", "dismiss"],
    "under_review": ["confirm", "dismiss"],
    "confirmed": ["close"],
    "dismissed": ["reopen"],
    "closed": ["reopen"],
}
NEXT = {
    ("signalled", "review"): "under_review",
    ("signalled", "dismiss"): "dismissed",
    ("under_review", "confirm"): "confirmed",
    ("under_review", "dismiss"): "dismissed",
    ("confirmed", "close"): "closed",
    ("dismissed", "reopen"): "signalled",
    ("closed", "reopen"): "signalled",
}


def make_signal(
    signal_id: str,
    node: str,
    state: str,
    observed: int,
    expected: float | None,
    llr: float | None,
    prr: float | None = 3.1,
) -> Signal:
    cv = 3.1
    fires = llr is not None and llr >= cv
    return cast(
        Signal,
        {
            "id": signal_id,
            "node": node,
            "level": "model",
            "device_class": node.split("/")[0],
            "outcome": OUTCOME,
            "state": state,
            "allowed_actions": ALLOWED[state],
            "signal": fires,
            "fired": ["maxsprt", "evans"] if fires else [],
            "strength": (llr or 0.0) / cv,
            "table": {"a": observed, "b": 100 - observed, "c": 30, "d": 970},
            "prr": prr,
            "prr_ci": [1.6, 5.9] if prr else [None, None],
            "ror": 3.4 if prr else None,
            "ror_ci": [1.7, 6.8] if prr else [None, None],
            "ic": 1.2,
            "ic025": 0.61,
            "ebgm": 2.4,
            "eb05": 1.7,
            "observed": observed,
            "expected": expected,
            "llr": llr,
            "cv": cv,
            "updated_at": "2026-01-05T10:00:00+00:00",
        },
    )


def history_points() -> list[HistoryPoint]:
    return [
        {
            "period": "2023Q1",
            "observed": 2,
            "expected": 0.7,
            "llr": 0.5,
            "cv": 3.1,
            "signal": False,
        },
        {"period": "2023Q2", "observed": 6, "expected": 1.4, "llr": 3.6, "cv": 3.1, "signal": True},
        {
            "period": "2023Q3",
            "observed": 9,
            "expected": None,
            "llr": None,
            "cv": 3.1,
            "signal": True,
        },
    ]


class FakeApi:
    """The regulator API in memory, with the lifecycle's transitions."""

    def __init__(self) -> None:
        self.signals_by_id: dict[str, Signal] = {
            s["id"]: s
            for s in (
                make_signal("sig-1", FAULTY, "signalled", 12, 4.1, 6.2),
                make_signal("sig-2", "hip/Orthomedica/Femora 7", "none", 5, 4.8, 0.01),
                make_signal("sig-3", "knee/Genuflex/GX-100", "dismissed", 0, 2.0, None, prr=None),
            )
        }
        self.events: dict[str, list[dict[str, Any]]] = {"sig-1": []}
        self.acted: list[tuple[str, str, str]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ApiUnreachable("cannot reach the API at http://test")

    def _get(self, signal_id: str) -> Signal:
        self._check()
        if signal_id not in self.signals_by_id:
            raise ApiProblem(404, "Not Found", f"no signal {signal_id}")
        return self.signals_by_id[signal_id]

    def status(self) -> Status:
        self._check()
        return {
            "ready": True,
            "patients": 120_345,
            "contributions_applied": 987_654,
            "latest_day": "2026-01-05",
            "updated_at": "2026-01-05T10:00:03+00:00",
            "config": {},
        }

    def signals(self, level: Level | None = None, state: State | None = None) -> SignalList:
        self._check()
        rows = [s for s in self.signals_by_id.values() if state is None or s["state"] == state]
        rows.sort(key=lambda s: -s["strength"])
        return {"at": "2026-01-05", "generated_at": "2026-01-05T10:00:03+00:00", "signals": rows}

    def signal(self, signal_id: str) -> SignalDetail:
        signal = self._get(signal_id)
        table = signal["table"]
        return cast(
            SignalDetail,
            {
                "signal": copy.deepcopy(signal),
                "assessment": {
                    "table": table,
                    "disproportionality": {"prr": signal["prr"], "prr_ci": signal["prr_ci"]},
                    "ebgm": {"ebgm": 2.4, "eb05": 1.7, "eb95": 3.3},
                    "maxsprt": {"llr": signal["llr"], "cv": signal["cv"]},
                },
                "events": self.events.get(signal_id, []),
                "reproduce": {
                    "disproportionality": "concierge stats disproportionality "
                    f"--a {table['a']} --b {table['b']} --c {table['c']} --d {table['d']}",
                    "maxsprt": "concierge stats maxsprt --model poisson --observed 12 "
                    "--expected 4.1",
                },
            },
        )

    def history(self, signal_id: str) -> History:
        self._get(signal_id)
        return {"signal": signal_id, "points": history_points()}

    def breakdown(self, signal_id: str, by: BreakdownBy) -> Breakdown:
        self._get(signal_id)
        return {
            "signal": signal_id,
            "by": by,
            "rows": [
                {
                    "key": "LOT-123",
                    "node": f"{FAULTY}/LOT-123",
                    "exposed": 120,
                    "with_outcome": 9,
                    "prr": 3.3,
                    "prr_ci": [1.5, 7.2],
                    "withheld": False,
                },
                {
                    "key": "LOT-999",
                    "node": f"{FAULTY}/LOT-999",
                    "exposed": "<10",
                    "with_outcome": "<10",
                    "prr": None,
                    "prr_ci": [None, None],
                    "withheld": True,
                },
            ],
        }

    def scan(self) -> ScanView:
        self._check()
        cut = {
            "tree": f"hip · {OUTCOME}",
            "node": FAULTY,
            "level": "model",
            "outcome": OUTCOME,
            "observed": 12,
            "expected": 3.5,
            "ratio": 12 / 3.5,
            "llr": 7.25,
            "p_value": 0.0004,
            "signal": True,
        }
        other = {**cut, "node": "hip/Orthomedica", "level": "manufacturer", "llr": 3.1,
                 "p_value": 0.2, "signal": False}  # fmt: skip
        look = {"look": 3, "at": "2026-01-05T10:00:00+00:00", "data_day": "2026-01-05",
                "alpha": 0.00048, "alpha_spent": 0.00144, "statistic": 7.25,
                "replications": 10_399, "complete": True, "signals": [cut],
                "top": [cut, other]}  # fmt: skip
        return cast(
            ScanView,
            {
                "plan": {"alpha": 0.05, "looks": 104, "rho": 1.0, "every_days": 7},
                "scheduled": True,
                "looks": [{**look, "signals": 1}],
                "latest": look,
            },
        )

    def provenance(self, signal_id: str, limit: int = 100) -> Provenance:
        self._get(signal_id)
        return {
            "signal": signal_id,
            "count": 1,
            "sources": [
                {
                    "patient": "pseudo-abc",
                    "role": "exposure",
                    "resource": "src|Procedure|p1",
                    "resource_type": "Procedure",
                    "resource_id": "p1",
                    "version": "2",
                    "last_updated": "2026-01-04T09:00:00+00:00",
                }
            ],
        }

    def act(self, signal_id: str, action: Action, reason: str) -> ActionResult:
        signal = self._get(signal_id)
        after = NEXT.get((signal["state"], action))
        if after is None:
            allowed = ", ".join(ALLOWED[signal["state"]]) or "none"
            raise ApiProblem(
                409, "Conflict", f"cannot {action} a {signal['state']} signal; {allowed}"
            )
        self.acted.append((signal_id, action, reason))
        self.events.setdefault(signal_id, []).append(
            {
                "schema": "concierge.signal-event/1",
                "signal": signal_id,
                "action": action,
                "from": signal["state"],
                "to": after,
                "actor": "regulator:test",
                "reason": reason,
                "version": len(self.events.get(signal_id, [])) + 1,
                "at": "2026-01-05T10:01:00+00:00",
            }
        )
        signal["state"] = after  # type: ignore[typeddict-item]
        signal["allowed_actions"] = ALLOWED[after]  # type: ignore[typeddict-item]
        return {"signal": copy.deepcopy(signal)}


# --------------------------------------------------------------------------- formatting


def test_numbers_and_intervals() -> None:
    assert regulator.fmt_number(None) == "—"
    assert regulator.fmt_number(float("inf")) == "—"
    assert regulator.fmt_number(3) == "3"
    assert regulator.fmt_number(3.14159) == "3.14"
    assert regulator.fmt_number(0.0004) == "0.00040"
    # never scientific notation: a strength of 6.6e-05 must not read as 6.6
    assert regulator.fmt_number(6.6e-05) == "0.000066"
    assert regulator.fmt_number(123_456.7) == "123,457"
    assert regulator.fmt_interval(3.1, [1.6, 5.9]) == "3.10 (1.60 to 5.90)"
    assert regulator.fmt_interval(3.1, [None, 5.9]) == "3.10 (— to 5.90)"
    assert regulator.fmt_interval(3.1, []) == "3.10 (— to —)"
    assert regulator.fmt_interval(None, [1.0, 2.0]) == "—"


def test_withheld_counts_are_shown_as_given() -> None:
    rows = regulator.breakdown_rows(FakeApi().breakdown("sig-1", "lot")["rows"])
    assert rows[0]["Exposed"] == "120"
    assert rows[1]["Exposed"] == "<10"
    assert rows[1]["With outcome"] == "<10"
    assert rows[1]["PRR (95% CI)"] == "—"


def test_times() -> None:
    assert regulator.fmt_time("2026-01-05T10:00:03+00:00") == "2026-01-05 10:00:03 UTC"
    assert regulator.fmt_time("2026-01-05T10:00:03Z", clock=True) == "10:00:03 UTC"
    assert regulator.fmt_time(None) == "—"
    assert regulator.fmt_time("yesterday") == "yesterday"


def test_signal_rows_mark_the_signalling_ones() -> None:
    signals = FakeApi().signals()["signals"]
    rows = regulator.signal_rows(signals)
    first = rows[0]
    assert first["Node"] == FAULTY
    assert first["State"] == "signalled"
    assert first["Rule"] == regulator.FIRES
    assert first["Outcome"] == OUTCOME
    assert first["Observed / expected"] == "12 / 4.10"
    assert first["PRR (95% CI)"] == "3.10 (1.60 to 5.90)"
    assert first["Fired"] == "maxsprt, evans"
    assert rows[1]["Rule"] == ""
    assert rows[2]["PRR (95% CI)"] == "—"
    styles = regulator.row_styles(signals)
    assert styles[0] == regulator.SIGNALLING_ROW_STYLE
    assert styles[1:] == ["", ""]
    assert regulator.signal_label(signals[0]) == f"{FAULTY} · {OUTCOME}"  # stable: no state


def test_states_read_as_words() -> None:
    assert regulator.fmt_state("under_review") == "under review"
    assert regulator.fmt_state("signalled") == "signalled"


def test_status_metrics() -> None:
    metrics = dict(regulator.status_metrics(FakeApi().status()))
    assert metrics["Patients with an implant"] == "120,345"
    assert metrics["Latest data day"] == "2026-01-05"
    assert metrics["Last update"] == "10:00:03 UTC"


def test_event_rows_read_from_and_to() -> None:
    api = FakeApi()
    api.act("sig-1", "review", "looking")
    (row,) = regulator.event_rows(api.signal("sig-1")["events"])
    assert row["From → to"] == "signalled → under review"
    assert row["Reason"] == "looking"


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONCIERGE_API_URL", "CONCIERGE_DASHBOARD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CONCIERGE_DASHBOARD_REFRESH_SECONDS", raising=False)
    config = DashboardSettings()
    assert (config.api, config.token, config.refresh_seconds, config.rows) == (
        "http://127.0.0.1:8000",
        None,
        2.0,
        15,
    )
    monkeypatch.setenv("CONCIERGE_API_URL", "http://api:9000")
    monkeypatch.setenv("CONCIERGE_DASHBOARD_TOKEN", "t")
    monkeypatch.setenv("CONCIERGE_DASHBOARD_REFRESH_SECONDS", "0.5")
    monkeypatch.setenv("CONCIERGE_DASHBOARD_ROWS", "40")
    config = DashboardSettings()
    assert config.api == "http://api:9000" and config.token is not None
    assert (config.token.get_secret_value(), config.refresh_seconds, config.rows) == ("t", 0.5, 40)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("CONCIERGE_DASHBOARD_REFRESH_SECONDS", "0"),
        ("CONCIERGE_DASHBOARD_REFRESH_SECONDS", "-1"),
        ("CONCIERGE_DASHBOARD_REFRESH_SECONDS", "soon"),
        ("CONCIERGE_DASHBOARD_REFRESH_SECONDS", "nan"),
        ("CONCIERGE_DASHBOARD_ROWS", "lots"),
        ("CONCIERGE_DASHBOARD_ROWS", "2"),
        ("CONCIERGE_DASHBOARD_ROWS", "5000"),
        ("CONCIERGE_DASHBOARD_PORT", "http"),
    ],
)
def test_a_bad_dashboard_setting_is_an_error_not_a_default(
    monkeypatch: pytest.MonkeyPatch, name: str, bad: str
) -> None:
    """It used to fall back silently (refresh 2 s, rows clamped to 5..1000): a typo in a
    deployment's variables went unnoticed."""
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValidationError) as caught:
        DashboardSettings()
    line = describe(caught.value, [DashboardSettings])
    assert line.startswith(f"bad configuration: {name}={bad!r}: "), line


def test_a_bad_setting_shows_one_line_on_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCIERGE_DASHBOARD_REFRESH_SECONDS", "soon")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    assert not at.exception
    (error,) = at.error
    assert error.value.startswith("bad configuration: CONCIERGE_DASHBOARD_REFRESH_SECONDS='soon'")
    assert not at.title  # nothing else is drawn


# --------------------------------------------------------------------------- charts


def _layers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for key in ("layer", "vconcat"):
        for child in spec.get(key, []):
            found.extend(_layers(child))
    if "mark" in spec:
        found.append(spec)
    return found


def test_history_frames_leave_out_missing_values() -> None:
    counts, llr = regulator.history_frames(history_points())
    assert list(counts["series"]) == [
        "observed",
        "expected",
        "observed",
        "expected",
        "observed",
    ]
    assert list(llr[llr["series"] == "critical value"]["value"]) == [3.1, 3.1, 3.1]
    assert list(llr[llr["series"] == "LLR"]["period"]) == ["2023Q1", "2023Q2"]


def test_observed_expected_chart_has_counts_and_the_boundary() -> None:
    spec = regulator.observed_expected_chart(history_points()).to_dict()
    assert len(spec["vconcat"]) == 2
    marks = _layers(spec)
    lines = [
        m
        for m in marks
        if (m["mark"]["type"] if isinstance(m["mark"], dict) else m["mark"]) == "line"
    ]
    assert len(lines) == 2  # cumulative counts; LLR with the critical value
    text = json.dumps(spec)
    for series in ("observed", "expected", "LLR", "critical value"):
        assert series in text
    assert "2023Q3" in text


def test_forest_rows_skip_what_a_log_scale_cannot_show() -> None:
    signal = make_signal("sig-x", FAULTY, "signalled", 12, 4.1, 6.2)
    signal["ror_ci"] = [0.0, 6.8]
    assessment: dict[str, Any] = {"disproportionality": {}, "ebgm": None}
    rows = regulator.forest_rows(signal, assessment)
    assert list(rows["measure"]) == ["PRR", "ROR", "EBGM"]
    ror = rows[rows["measure"] == "ROR"].iloc[0]
    assert ror["lo"] == ror["estimate"] and bool(ror["open"])
    none = make_signal("sig-y", FAULTY, "none", 0, 2.0, None, prr=None)
    none["ebgm"] = None
    assert len(regulator.forest_rows(none)) == 0


def test_forest_chart_is_on_a_log_scale_with_a_line_at_one() -> None:
    signal = make_signal("sig-x", FAULTY, "signalled", 12, 4.1, 6.2)
    spec = regulator.forest_chart(regulator.forest_rows(signal)).to_dict()
    text = json.dumps(spec)
    assert '"type": "log"' in text
    rules = [m for m in _layers(spec) if m["mark"]["type"] == "rule"]
    assert len(rules) == 2  # the reference line and the intervals
    (reference,) = [m for m in rules if m["encoding"]["x"]["field"] == "x"]
    datasets = spec["datasets"]
    assert any(rows == [{"x": 1.0}] for rows in datasets.values())
    assert reference["encoding"]["x"]["scale"]["type"] == "log"


# --------------------------------------------------------------------------- the client


def _client(handler: Any, token: str | None = "tok") -> SurveillanceClient:
    return SurveillanceClient("http://api.test/", token, transport=httpx.MockTransport(handler))


def test_client_sends_the_token_and_escapes_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"signal": "x", "points": []})

    with _client(handler) as client:
        client.history("sig/1 a")
        client.signals(level="model")
        client.act("sig-1", "review", "why")
    assert seen[0].headers["Authorization"] == "Bearer tok"
    assert seen[0].url.raw_path == b"/v1/surveillance/signals/sig%2F1%20a/history"
    assert seen[1].url.params["level"] == "model" and "state" not in seen[1].url.params
    assert json.loads(seen[2].content) == {"action": "review", "reason": "why"}


def test_client_explains_auth_failures() -> None:
    def unauthorised(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "token expired"})

    with pytest.raises(ApiAuthError, match=r"token expired.*concierge token create") as info:
        _client(unauthorised).status()
    assert info.value.status == 401
    with pytest.raises(ApiAuthError, match="CONCIERGE_DASHBOARD_TOKEN"):
        _client(unauthorised, token=None).status()

    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"title": "Forbidden", "detail": "you are sponsor"})

    with pytest.raises(ApiAuthError, match=r"you are sponsor.*role regulator"):
        _client(forbidden).status()


def test_client_surfaces_problem_detail() -> None:
    def conflict(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            409,
            json={"title": "Conflict", "detail": "allowed: review, dismiss", "status": 409},
            headers={"content-type": "application/problem+json"},
        )

    with pytest.raises(ApiProblem) as info:
        _client(conflict).act("sig-1", "close", "done")
    assert info.value.status == 409
    assert info.value.detail == "allowed: review, dismiss"
    assert str(info.value) == "Conflict (409): allowed: review, dismiss"

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="boom")

    with pytest.raises(ApiProblem, match="boom"):
        _client(broken).status()


def test_client_says_when_the_api_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ApiUnreachable, match=r"cannot reach the API at http://api\.test"):
        _client(refuse).status()


# --------------------------------------------------------------------------- the page


APP = Path(regulator.__file__)


def page(api: FakeApi, signal: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[regulator.CLIENT_KEY] = api
    if signal:
        at.query_params[regulator.SIGNAL_KEY] = signal
    return at.run()


def _texts(at: AppTest) -> str:
    parts = [e.value for e in (*at.markdown, *at.caption, *at.subheader, *at.title)]
    return "\n".join(str(p) for p in parts)


def test_page_shows_status_and_the_ranked_signal_table() -> None:
    at = page(FakeApi())
    assert not at.exception
    assert not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Patients with an implant"] == "120,345"
    assert metrics["Latest data day"] == "2026-01-05"
    first = at.table[0].value.iloc[0]
    assert (first["Node"], first["Outcome"], first["State"]) == (FAULTY, OUTCOME, "signalled")
    assert at.selectbox(key=regulator.SIGNAL_KEY).value is None
    assert not at.button  # no detail, so no lifecycle actions yet


def test_choosing_a_signal_shows_its_detail_and_actions() -> None:
    at = page(FakeApi())
    at.selectbox(key=regulator.SIGNAL_KEY).set_value("sig-1").run()
    assert not at.exception
    assert not at.error
    assert f"{FAULTY} · {OUTCOME}" in [s.value for s in at.subheader]
    text = _texts(at)
    for section in ("Observed vs expected", "Disproportionality", "Drill-down", "Provenance"):
        assert section in text
    codes = [c.value for c in at.code]
    assert "concierge stats disproportionality --a 12 --b 88 --c 30 --d 970" in codes
    # the tree scan; observed vs expected, LLR vs the boundary, the forest plot
    assert len(at.get("vega_lite_chart")) == 4
    breakdown = next(t.value for t in at.table if "Exposed" in t.value.columns)
    assert list(breakdown.index) == ["LOT-123"]  # withheld rows are counted, not listed
    assert "1 site rows with counts below the small-number threshold" in text
    assert {b.label for b in at.button} >= {"Start review", "Dismiss"}


def test_a_shared_link_opens_the_signal() -> None:
    at = page(FakeApi(), signal="sig-1")
    assert f"{FAULTY} · {OUTCOME}" in [s.value for s in at.subheader]


def test_a_label_that_comes_back_as_the_value_finds_its_signal() -> None:
    # Streamlit keeps a selectbox's value as its label; a label it cannot match comes back raw.
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[regulator.CLIENT_KEY] = FakeApi()
    at.session_state[regulator.SIGNAL_KEY] = f"{FAULTY} · {OUTCOME}"
    at.run()
    assert not at.exception
    assert at.selectbox(key=regulator.SIGNAL_KEY).value == "sig-1"
    assert f"{FAULTY} · {OUTCOME}" in [s.value for s in at.subheader]


def test_an_action_with_a_reason_moves_the_signal() -> None:
    api = FakeApi()
    at = page(api, signal="sig-1")
    at.text_area(key="reason-sig-1-0").input("cluster at two sites")
    at.button(key="action-review").click().run()
    assert not at.exception
    assert not at.error
    assert api.acted == [("sig-1", "review", "cluster at two sites")]
    assert any("now under review" in s.value for s in at.success)
    assert {b.label for b in at.button} >= {"Confirm", "Dismiss"}
    assert "under review" in list(at.table[0].value["State"])


def test_an_action_needs_a_reason() -> None:
    api = FakeApi()
    at = page(api, signal="sig-1")
    at.button(key="action-dismiss").click().run()
    assert api.acted == []
    assert any("Give a reason" in e.value for e in at.error)


def test_a_refused_action_shows_the_problem_detail() -> None:
    api = FakeApi()
    at = page(api, signal="sig-1")
    api.signals_by_id["sig-1"]["state"] = "closed"  # moved on elsewhere since the page was drawn
    at.text_area(key="reason-sig-1-0").input("again")
    at.button(key="action-review").click().run()
    assert any("Conflict (409)" in e.value and "cannot review" in e.value for e in at.error)


def test_an_unreachable_api_is_an_error_on_the_page() -> None:
    api = FakeApi()
    api.down = True
    at = page(api)
    assert not at.exception
    assert any("cannot reach the API" in e.value for e in at.error)


# --------------------------------------------------------------------------- concierge dashboard


def test_dashboard_command_runs_streamlit_with_the_api_and_a_regulator_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_exec(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))

    monkeypatch.setattr(dashboard_cli.os, "execve", fake_exec)
    monkeypatch.delenv("CONCIERGE_DASHBOARD_TOKEN", raising=False)
    monkeypatch.delenv("CONCIERGE_DASHBOARD_PORT", raising=False)
    result = CliRunner().invoke(
        dashboard_cli.dashboard, ["--api-url", "http://api.test:9000", "--refresh", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8501" in result.output
    ((_, argv, env),) = calls
    assert argv[1:4] == ["-m", "streamlit", "run"]
    assert Path(argv[4]) == APP
    options = dict(zip(argv[5::2], argv[6::2], strict=True))
    assert options == {
        "--server.headless": "true",
        "--server.port": "8501",
        "--server.address": "127.0.0.1",
        "--browser.gatherUsageStats": "false",
        "--client.toolbarMode": "minimal",
    }
    assert env["CONCIERGE_API_URL"] == "http://api.test:9000"
    assert env["CONCIERGE_DASHBOARD_REFRESH_SECONDS"] == "0.5"
    key = get_settings().token_key.get_secret_value().encode()
    assert verify(key, env["CONCIERGE_DASHBOARD_TOKEN"]).role == "regulator"
    assert env["CONCIERGE_DASHBOARD_TOKEN"] not in result.output


def test_dashboard_command_passes_a_given_token_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    envs: list[dict[str, str]] = []
    monkeypatch.setattr(dashboard_cli.os, "execve", lambda path, argv, env: envs.append(env))
    monkeypatch.delenv("CONCIERGE_DASHBOARD_TOKEN", raising=False)
    monkeypatch.setenv("CONCIERGE_DASHBOARD_PORT", "9999")
    result = CliRunner().invoke(dashboard_cli.dashboard, ["--token", "given"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:9999" in result.output
    assert envs[0]["CONCIERGE_DASHBOARD_TOKEN"] == "given"
    result = CliRunner().invoke(dashboard_cli.dashboard, ["--token", "t", "--port", "7000"])
    assert "http://127.0.0.1:7000" in result.output


def test_dashboard_is_a_concierge_verb() -> None:
    from concierge.cli import main

    result = CliRunner().invoke(main, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "regulator" in result.output


def test_the_tree_scan_chart_and_looks() -> None:
    view = FakeApi().scan()
    assert view["latest"] is not None
    frame = regulator.scan_frame(view["latest"]["top"])
    assert list(frame["cut"]) == [f"{FAULTY} · {OUTCOME}", f"hip/Orthomedica · {OUTCOME}"]
    assert list(frame["signal"]) == ["passes", "does not pass"]
    spec = regulator.scan_chart(frame).to_dict()
    assert spec["encoding"]["x"]["field"] == "llr" and spec["mark"]["type"] == "bar"
    rows = regulator.look_rows(view)
    assert rows[0]["Look"] == "3" and rows[0]["Alpha spent"] == "0.0014"


def test_page_shows_the_tree_scan() -> None:
    at = page(FakeApi())
    assert not at.exception
    assert "Tree-based scan over the device hierarchy" in [s.value for s in at.subheader]
    assert len(at.get("vega_lite_chart")) == 1  # the scan chart, before any signal is chosen
    text = _texts(at)
    assert "look 3" in text and "1 cuts pass" in text


def test_drill_down_opens_at_a_readable_level() -> None:
    assert regulator.default_breakdown("model") == "site"
    assert regulator.default_breakdown("lot") == "site"
    assert regulator.default_breakdown("manufacturer") == "model"
    assert regulator.default_breakdown("class") == "manufacturer"


def test_the_dashboard_hides_streamlits_developer_toolbar() -> None:
    from concierge.commands.dashboard import streamlit_command

    command = streamlit_command(Path("app.py"), 8501)
    assert command[command.index("--client.toolbarMode") + 1] == "minimal"
