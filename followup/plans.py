"""A trial's follow-up plan: what data it receives, which events are safety events, who is told.

Declared by the trial's data manager (``PUT /v1/followup/trials/{trial}/plan``) and kept in the
follow-up database; the consumer reads the current plan of every trial it forwards for.

* ``scope``: the kinds of facts the trial receives (its declared data scope); ``death`` is the
  only thing ever taken from a Patient resource (the fact and its date, nothing else);
* ``outcomes``: safety-event definitions, each evaluated on every forwarded fact of a
  participant (:func:`matches`): a serious adverse event (``seriousness`` serious, optionally
  limited to codes), a coded event (a hospital admission as a procedure or condition code, or
  anything else coded), death, or a laboratory value above a multiple of its upper limit of
  normal in the same unit (ALT > 3 x ULN);
* ``safety_contact``: where a safety event is sent (an e-mail address, or an https webhook),
  through recruitment's outbox;
* ``endpoint``: the outcome definition counted per arm for the statistician.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.codes import UnknownSystem, code_of, term_code
from core.contracts.facts import (
    AdverseEventFact,
    ConditionFact,
    ObservationFact,
    PatientFact,
    ProcedureFact,
    ResourceFacts,
)
from core.db import NO_NUL

PLAN_SCHEMA = "concierge.followup-plan/1"
SCOPE_KINDS = (
    "condition",
    "observation",
    "medication",
    "procedure",
    "device_exposure",
    "adverse_event",
    "death",
)
ScopeKind = Literal[
    "condition",
    "observation",
    "medication",
    "procedure",
    "device_exposure",
    "adverse_event",
    "death",
]
SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Model):
    system: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    code: str = Field(min_length=1, max_length=100, pattern=NO_NUL)

    @field_validator("system")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            return term_code(value, "x")[0]
        except UnknownSystem as exc:
            raise ValueError(str(exc)) from None

    def token(self) -> tuple[str, str]:
        return term_code(self.system, self.code)


class Outcome(_Model):
    """One safety-event or endpoint definition."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9 _.:()/<>=+%-]+$")
    kind: Literal["serious_adverse_event", "coded", "death", "lab_threshold"]
    #: ``coded`` and ``lab_threshold``: the codes that count (any of them); for
    #: ``serious_adverse_event`` optional: only these events when given.
    codes: tuple[Code, ...] = Field(default=(), max_length=500)
    #: ``lab_threshold``: the upper limit of normal, its UCUM unit and the multiple (3 for
    #: ALT > 3 x ULN): a value strictly above ``times_uln * uln`` in ``unit`` matches.
    uln: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    unit: str | None = Field(default=None, min_length=1, max_length=50, pattern=NO_NUL)
    times_uln: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _complete(self) -> Outcome:
        if self.kind in ("coded", "lab_threshold") and not self.codes:
            raise ValueError(f"a {self.kind} outcome names its codes")
        if self.kind == "lab_threshold" and None in (self.uln, self.unit, self.times_uln):
            raise ValueError("a lab_threshold outcome gives uln, unit and times_uln")
        if self.kind != "lab_threshold" and (self.uln or self.unit or self.times_uln):
            raise ValueError("uln, unit and times_uln belong to lab_threshold outcomes only")
        return self


class SafetyContact(_Model):
    channel: Literal["email", "webhook"]
    address: str = Field(min_length=3, max_length=500, pattern=NO_NUL)

    @model_validator(mode="after")
    def _address(self) -> SafetyContact:
        if self.channel == "email" and "@" not in self.address:
            raise ValueError("an e-mail safety contact needs an e-mail address")
        if self.channel == "webhook" and not self.address.startswith(("https://", "http://")):
            raise ValueError("a webhook safety contact needs an http(s) URL")
        return self


class Plan(_Model):
    """The follow-up plan of one trial (the body of ``PUT .../plan``)."""

    scope: tuple[ScopeKind, ...] = Field(min_length=1)
    outcomes: tuple[Outcome, ...] = Field(default=(), max_length=50)
    safety_contact: SafetyContact | None = None
    #: The name of the outcome counted per arm (one of ``outcomes``).
    endpoint: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        names = [o.name for o in self.outcomes]
        if len(set(names)) != len(names):
            raise ValueError("outcome names must be unique")
        if self.endpoint is not None and self.endpoint not in names:
            raise ValueError(f"endpoint {self.endpoint!r} is not one of the outcomes")
        if self.outcomes and self.safety_contact is None:
            raise ValueError("a plan with safety outcomes names its safety_contact")
        return self


def _codes_match(codes: Sequence[Code], found: Sequence[object]) -> bool:
    wanted = {c.token() for c in codes}
    return any(code_of(c.system, c.code) in wanted for c in found)  # type: ignore[attr-defined]


def matches(outcome: Outcome, envelope: ResourceFacts) -> bool:
    """Whether this version of a resource is an event of ``outcome`` (a retraction is none)."""
    if envelope.retracted:
        return False
    for fact in envelope.facts:
        if outcome.kind == "death":
            if isinstance(fact, PatientFact) and fact.deceased:
                return True
        elif outcome.kind == "serious_adverse_event":
            if (
                isinstance(fact, AdverseEventFact)
                and fact.actuality == "actual"
                and any(c.system == SERIOUSNESS and c.code == "serious" for c in fact.seriousness)
                and (not outcome.codes or _codes_match(outcome.codes, fact.codes))
            ):
                return True
        elif outcome.kind == "coded":
            if isinstance(fact, ConditionFact | ProcedureFact | AdverseEventFact) and _codes_match(
                outcome.codes, fact.codes
            ):
                if isinstance(fact, ConditionFact) and fact.verification_status in (
                    "refuted",
                    "entered-in-error",
                ):
                    continue
                return True
        elif (
            isinstance(fact, ObservationFact)
            and fact.status in ("final", "amended", "corrected", "preliminary")
            and _codes_match(outcome.codes, fact.codes)
            and lab_above(outcome, fact)
        ):
            return True
    return False


def lab_above(outcome: Outcome, fact: ObservationFact) -> bool:
    """A value above ``times_uln * uln``, compared only in the outcome's own unit (a value in
    another unit is not guessed at: :func:`uninterpretable` reports it)."""
    assert outcome.uln is not None and outcome.times_uln is not None
    if fact.value is None or fact.unit is None or fact.unit != outcome.unit:
        return False
    return fact.value > outcome.times_uln * outcome.uln


def uninterpretable(outcome: Outcome, envelope: ResourceFacts) -> str | None:
    """Why a lab result of the outcome's codes cannot be evaluated (its unit differs, or it has
    no value), or None: the consumer records it beside the safety events, never drops it."""
    if outcome.kind != "lab_threshold" or envelope.retracted:
        return None
    for fact in envelope.facts:
        if isinstance(fact, ObservationFact) and _codes_match(outcome.codes, fact.codes):
            if fact.value is None:
                return "the result has no numeric value"
            if fact.unit != outcome.unit:
                return f"the result's unit {fact.unit!r} is not the outcome's {outcome.unit!r}"
    return None
