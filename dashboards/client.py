"""A small typed client for the regulator API (``/v1/surveillance``, role ``regulator``).

The dashboard reads everything through :class:`SurveillanceApi`; :class:`SurveillanceClient` is
its one real implementation (httpx). Unit tests pass an in-memory fake instead, or an
``httpx.MockTransport`` to this client.

Errors are :class:`ApiError` subclasses whose message is fit to show a person as it is: the API
is unreachable, the token is missing, expired or of the wrong role, or the API refused with a
problem+json ``detail``.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, Protocol, TypedDict, cast
from urllib.parse import quote

import httpx

from core.contracts.signals import SignalEvent

Level = Literal["class", "manufacturer", "model", "lot"]
State = Literal["none", "signalled", "under_review", "confirmed", "dismissed", "closed"]
Action = Literal["review", "confirm", "dismiss", "close", "reopen"]
BreakdownBy = Literal["manufacturer", "model", "lot", "site"]

LEVELS: tuple[Level, ...] = ("class", "manufacturer", "model", "lot")
STATES: tuple[State, ...] = (
    "none",
    "signalled",
    "under_review",
    "confirmed",
    "dismissed",
    "closed",
)
ACTIONS: tuple[Action, ...] = ("review", "confirm", "dismiss", "close", "reopen")
BREAKDOWNS: tuple[BreakdownBy, ...] = ("manufacturer", "model", "lot", "site")


class Table(TypedDict):
    """The 2x2 table: a exposed with outcome, b exposed without, c others with, d others without."""

    a: int
    b: int
    c: int
    d: int


class Signal(TypedDict):
    """A node of the device hierarchy and one outcome, with its statistics and lifecycle state."""

    id: str
    node: str
    level: Level
    device_class: str
    outcome: str
    state: State
    allowed_actions: list[Action]
    #: Whether the statistical rule fires now (independent of the lifecycle state).
    signal: bool
    fired: list[str]
    #: llr / cv: at least 1 means at or over the signalling boundary.
    strength: float
    table: Table
    prr: float | None
    prr_ci: list[float | None]
    ror: float | None
    ror_ci: list[float | None]
    ic: float | None
    ic025: float | None
    ebgm: float | None
    eb05: float | None
    observed: int
    expected: float | None
    #: the comparator's crude rate times the node's person-time (``expected`` is standardised)
    expected_crude: NotRequired[float | None]
    llr: float | None
    cv: float | None
    updated_at: str | None


class Status(TypedDict):
    ready: bool
    #: exact for site admins; for regulators under the small-number rule (``"<10"``) and rounded
    patients: int | str
    contributions_applied: int
    latest_day: str | None
    updated_at: str
    config: dict[str, Any]


class SignalList(TypedDict):
    at: str
    generated_at: str
    signals: list[Signal]


class SignalDetail(TypedDict):
    signal: Signal
    assessment: dict[str, Any]
    events: list[SignalEvent]
    reproduce: dict[str, str]


class HistoryPoint(TypedDict):
    period: str
    observed: int
    expected: float | None
    llr: float | None
    cv: float | None
    signal: bool


class History(TypedDict):
    signal: str
    points: list[HistoryPoint]


class BreakdownRow(TypedDict):
    key: str
    node: str
    #: A count, or a string such as "<10" where small-number rules withhold it.
    exposed: int | str
    with_outcome: int | str
    prr: float | None
    prr_ci: list[float | None]
    #: a count is withheld, so the ratio is too
    withheld: NotRequired[bool]


class Breakdown(TypedDict):
    signal: str
    by: BreakdownBy
    rows: list[BreakdownRow]


class Source(TypedDict):
    patient: str
    role: Literal["exposure", "outcome"]
    resource: str
    resource_type: str
    resource_id: str
    version: str | None
    last_updated: str | None


class Provenance(TypedDict):
    signal: str
    count: int
    sources: list[Source]


class ActionResult(TypedDict):
    signal: Signal


class ScanCut(TypedDict):
    tree: str
    node: str
    level: Level
    outcome: str
    observed: int
    expected: float
    ratio: float | None
    llr: float
    p_value: float
    signal: bool


class ScanLook(TypedDict):
    look: int | None
    at: str
    data_day: str | None
    alpha: float
    alpha_spent: float
    statistic: float
    replications: int
    complete: bool
    signals: list[ScanCut]
    top: list[ScanCut]


class ScanView(TypedDict):
    """``GET /v1/surveillance/scan``: the plan, the looks so far, the latest scan."""

    plan: dict[str, Any]
    scheduled: bool
    looks: list[dict[str, Any]]
    latest: ScanLook | None


class ApiError(Exception):
    """Anything that kept an answer from the API; ``str()`` is the message for a person."""


class ApiUnreachable(ApiError):
    pass


class ApiAuthError(ApiError):
    """401 (no, bad or expired token) or 403 (a token of another role)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ApiProblem(ApiError):
    """Any other error answer; ``detail`` comes from its problem+json body when there is one."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{title} ({status}): {detail}" if detail else f"{title} ({status})")
        self.status = status
        self.title = title
        self.detail = detail


class SurveillanceApi(Protocol):
    """What the dashboard needs from the regulator API."""

    def status(self) -> Status: ...

    def signals(self, level: Level | None = None, state: State | None = None) -> SignalList: ...

    def signal(self, signal_id: str) -> SignalDetail: ...

    def history(self, signal_id: str) -> History: ...

    def breakdown(self, signal_id: str, by: BreakdownBy) -> Breakdown: ...

    def provenance(self, signal_id: str, limit: int = 100) -> Provenance: ...

    def act(self, signal_id: str, action: Action, reason: str) -> ActionResult: ...

    def scan(self) -> ScanView: ...


def _problem(response: httpx.Response) -> tuple[str, str]:
    """(title, detail) of an error answer, from problem+json, FastAPI's ``detail`` or the text."""
    title = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        return title, response.text.strip()[:500]
    if not isinstance(body, dict):
        return title, str(body)[:500]
    detail = body.get("detail", "")
    if not isinstance(detail, str):  # FastAPI validation errors: a list of objects
        detail = str(detail)
    return str(body.get("title") or title), detail


class SurveillanceClient:
    """The regulator API over HTTP, with a bearer token."""

    PREFIX = "/v1/surveillance"

    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json, application/problem+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._has_token = bool(token)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SurveillanceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(
        self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None
    ) -> Any:
        url = f"{self.PREFIX}{path}"
        try:
            response = self._http.request(
                method,
                url,
                params={k: v for k, v in (params or {}).items() if v is not None},
                json=body,
            )
        except httpx.TimeoutException:
            raise ApiUnreachable(
                f"the API at {self.base_url} did not answer in time ({method} {url})"
            ) from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"cannot reach the API at {self.base_url} ({exc.__class__.__name__}: {exc}); "
                "is `concierge api` running and CONCIERGE_API_URL right?"
            ) from None
        if response.status_code == 401:
            _, detail = _problem(response)
            hint = (
                "no token was given: set CONCIERGE_DASHBOARD_TOKEN to a regulator token"
                if not self._has_token
                else "the token was refused; issue a new one with "
                "`concierge token create --role regulator --org <org>` "
                "(it must be signed with the API's CONCIERGE_TOKEN_KEY)"
            )
            raise ApiAuthError(f"not authenticated ({detail or 'no detail'}): {hint}", 401)
        if response.status_code == 403:
            _, detail = _problem(response)
            raise ApiAuthError(
                f"forbidden ({detail or 'no detail'}): the dashboard needs a token with the "
                "role regulator",
                403,
            )
        if response.is_error:
            title, detail = _problem(response)
            raise ApiProblem(response.status_code, title, detail)
        try:
            return response.json()
        except ValueError:
            raise ApiProblem(
                response.status_code, "not JSON", f"{method} {url} answered {response.text[:200]!r}"
            ) from None

    @staticmethod
    def _id(signal_id: str) -> str:
        return quote(signal_id, safe="")

    def status(self) -> Status:
        return cast(Status, self._request("GET", "/status"))

    def signals(self, level: Level | None = None, state: State | None = None) -> SignalList:
        return cast(SignalList, self._request("GET", "/signals", {"level": level, "state": state}))

    def signal(self, signal_id: str) -> SignalDetail:
        return cast(SignalDetail, self._request("GET", f"/signals/{self._id(signal_id)}"))

    def history(self, signal_id: str) -> History:
        return cast(History, self._request("GET", f"/signals/{self._id(signal_id)}/history"))

    def breakdown(self, signal_id: str, by: BreakdownBy) -> Breakdown:
        return cast(
            Breakdown,
            self._request("GET", f"/signals/{self._id(signal_id)}/breakdown", {"by": by}),
        )

    def provenance(self, signal_id: str, limit: int = 100) -> Provenance:
        return cast(
            Provenance,
            self._request("GET", f"/signals/{self._id(signal_id)}/provenance", {"limit": limit}),
        )

    def scan(self) -> ScanView:
        return cast(ScanView, self._request("GET", "/scan"))

    def act(self, signal_id: str, action: Action, reason: str) -> ActionResult:
        return cast(
            ActionResult,
            self._request(
                "POST",
                f"/signals/{self._id(signal_id)}/actions",
                body={"action": action, "reason": reason},
            ),
        )
