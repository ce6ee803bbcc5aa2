"""The rules that hold a candidate back, as one pure function over plain values.

:func:`evaluate` returns every rule that holds a candidate back (not only the first), each with a
reason a clinician or an auditor can read. No hold means the candidate may be invited; routing
then decides to whom. The service gathers the inputs from the database; the rules themselves never
touch it, so each one is a unit test.

Rules (each a :class:`Rule`):

* ``research_opt_out`` and ``deceased`` exclude the patient: such a patient is never a candidate
  (opt-outs win); a new opt-out also withdraws every open invitation (the service does that).
* ``profile_missing``: no Patient record has arrived for the pseudonym yet, so neither the GP nor
  an opt-out can be known; re-evaluated when it arrives.
* ``trial_not_recruiting`` / ``site_not_recruiting``: the trial is not active, or the site is not
  one of its recruiting sites.
* ``previously_invited``: the patient was already invited to this trial and the invitation got
  past the clinician (a new invitation is allowed only after one withdrawn or expired before the
  patient was contacted).
* ``active_invitation``: at most one open invitation per patient across all trials.
* ``cooldown``: a decline blocks every new invitation for ``cooldown`` (90 days by default).
* ``yearly_cap``: at most ``yearly_cap`` invitations per patient per ``cap_window`` (3 per 365
  days) across all trials. An invitation counts while it is open and, once closed, when it
  reached the patient: one that a clinician rejected, or that was withdrawn or expired before
  contact, never bothered the patient.
* ``trial_capacity`` / ``site_capacity``: routing stops once enrolled plus open invitations reach
  the trial's (or the site's) target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from .lifecycle import ACTIVE, InvitationState


class Rule(StrEnum):
    RESEARCH_OPT_OUT = "research_opt_out"
    DECEASED = "deceased"
    PROFILE_MISSING = "profile_missing"
    TRIAL_NOT_RECRUITING = "trial_not_recruiting"
    SITE_NOT_RECRUITING = "site_not_recruiting"
    PREVIOUSLY_INVITED = "previously_invited"
    ACTIVE_INVITATION = "active_invitation"
    COOLDOWN = "cooldown"
    YEARLY_CAP = "yearly_cap"
    TRIAL_CAPACITY = "trial_capacity"
    SITE_CAPACITY = "site_capacity"
    #: Not a rule of :func:`evaluate`: routing found nobody to send the candidate to.
    NO_CLINICIAN = "no_clinician"


#: Rules that make a patient "not a candidate" rather than "a candidate held back for now".
EXCLUDING: frozenset[Rule] = frozenset({Rule.RESEARCH_OPT_OUT, Rule.DECEASED})


@dataclass(frozen=True)
class Policy:
    cooldown: timedelta = timedelta(days=90)
    yearly_cap: int = 3
    cap_window: timedelta = timedelta(days=365)


@dataclass(frozen=True)
class Hold:
    rule: Rule
    reason: str
    #: When a time-bound hold lifts by itself (cool-down, yearly cap), if it does.
    until: datetime | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "rule": self.rule.value,
            "reason": self.reason,
            "until": self.until.isoformat() if self.until else None,
        }


@dataclass(frozen=True)
class PatientView:
    known: bool
    research_opt_out: bool = False
    deceased: bool = False


@dataclass(frozen=True)
class TrialView:
    id: str
    status: str
    recruiting_sites: frozenset[str]
    target: int | None = None
    site_targets: Mapping[str, int] = field(default_factory=dict)

    @property
    def recruiting(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class PastInvitation:
    """One of the patient's invitations, to any trial."""

    id: str
    trial: str
    state: InvitationState
    created_at: datetime
    state_changed_at: datetime
    #: The patient was approached (the invitation reached ``patient_contacted`` at some point).
    reached_patient: bool

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass(frozen=True)
class Usage:
    """How much of a trial's capacity is taken: enrolled plus open invitations."""

    trial: int = 0
    site: int = 0


@dataclass(frozen=True)
class RuleInput:
    trial: TrialView
    site: str
    patient: PatientView
    #: Every invitation of this patient, to any trial.
    invitations: Sequence[PastInvitation]
    usage: Usage
    now: datetime


def counts_toward_cap(invitation: PastInvitation) -> bool:
    return invitation.active or invitation.reached_patient


def evaluate(inp: RuleInput, policy: Policy) -> tuple[Hold, ...]:
    """Every rule that holds this candidate back now; empty when it may be invited."""
    holds: list[Hold] = []
    patient, trial, now = inp.patient, inp.trial, inp.now

    if patient.research_opt_out:
        holds.append(Hold(Rule.RESEARCH_OPT_OUT, "the patient has a research opt-out"))
    if patient.deceased:
        holds.append(Hold(Rule.DECEASED, "the patient is recorded as deceased"))
    if not patient.known:
        holds.append(
            Hold(Rule.PROFILE_MISSING, "no patient record received yet (GP and opt-out unknown)")
        )

    if not trial.recruiting:
        holds.append(
            Hold(Rule.TRIAL_NOT_RECRUITING, f"trial {trial.id} is {trial.status}, not recruiting")
        )
    if inp.site not in trial.recruiting_sites:
        holds.append(
            Hold(
                Rule.SITE_NOT_RECRUITING,
                f"site {inp.site} is not a recruiting site of trial {trial.id}",
            )
        )

    same_trial = [i for i in inp.invitations if i.trial == trial.id]
    blocking = [
        i
        for i in same_trial
        if not i.active
        and (
            i.reached_patient or i.state not in (InvitationState.WITHDRAWN, InvitationState.EXPIRED)
        )
    ]
    if blocking:
        last = max(blocking, key=lambda i: i.state_changed_at)
        holds.append(
            Hold(
                Rule.PREVIOUSLY_INVITED,
                f"already invited to trial {trial.id} (invitation {last.id} ended "
                f"{last.state.value})",
            )
        )

    active = [i for i in inp.invitations if i.active]
    if active:
        current = active[0]
        holds.append(
            Hold(
                Rule.ACTIVE_INVITATION,
                f"the patient has an open invitation ({current.id}, trial {current.trial}, "
                f"{current.state.value})",
            )
        )

    declines = [i for i in inp.invitations if i.state is InvitationState.DECLINED]
    if declines:
        last = max(declines, key=lambda i: i.state_changed_at)
        until = last.state_changed_at + policy.cooldown
        if now < until:
            holds.append(
                Hold(
                    Rule.COOLDOWN,
                    f"declined trial {last.trial} on {last.state_changed_at.date().isoformat()}; "
                    f"cool-down of {policy.cooldown.days} days until "
                    f"{until.date().isoformat()}",
                    until,
                )
            )

    window_start = now - policy.cap_window
    counted = sorted(
        (i for i in inp.invitations if counts_toward_cap(i) and i.created_at > window_start),
        key=lambda i: i.created_at,
    )
    if len(counted) >= policy.yearly_cap:
        # The cap lifts when enough of the counted invitations leave the window.
        until = counted[len(counted) - policy.yearly_cap].created_at + policy.cap_window
        holds.append(
            Hold(
                Rule.YEARLY_CAP,
                f"{len(counted)} invitations in the last {policy.cap_window.days} days "
                f"(cap {policy.yearly_cap}, across all trials)",
                until,
            )
        )

    if trial.target is not None and inp.usage.trial >= trial.target:
        holds.append(
            Hold(
                Rule.TRIAL_CAPACITY,
                f"trial {trial.id} has {inp.usage.trial} enrolled or invited of its target "
                f"{trial.target}",
            )
        )
    site_target = trial.site_targets.get(inp.site)
    if site_target is not None and inp.usage.site >= site_target:
        holds.append(
            Hold(
                Rule.SITE_CAPACITY,
                f"site {inp.site} has {inp.usage.site} enrolled or invited of its target "
                f"{site_target} for trial {trial.id}",
            )
        )
    return tuple(holds)


def excludes(holds: Sequence[Hold]) -> bool:
    """True when the holds make the patient "not a candidate" (opt-out, deceased)."""
    return any(h.rule in EXCLUDING for h in holds)


__all__ = [
    "EXCLUDING",
    "Hold",
    "PastInvitation",
    "PatientView",
    "Policy",
    "Rule",
    "RuleInput",
    "TrialView",
    "Usage",
    "counts_toward_cap",
    "evaluate",
    "excludes",
]
