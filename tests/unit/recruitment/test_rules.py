"""The rules that hold candidates back, and routing, as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from recruitment.lifecycle import InvitationState
from recruitment.routing import MemoryDirectory, RoleCode, Via, is_trial_recruiter, route
from recruitment.rules import (
    PastInvitation,
    PatientView,
    Policy,
    Rule,
    RuleInput,
    TrialView,
    Usage,
    evaluate,
    excludes,
)

S = InvitationState
NOW = datetime(2026, 6, 1, tzinfo=UTC)
POLICY = Policy(cooldown=timedelta(days=90), yearly_cap=3, cap_window=timedelta(days=365))
TRIAL = TrialView("t1", "active", frozenset({"RA3", "RB1"}), target=10, site_targets={"RA3": 4})
OK_PATIENT = PatientView(known=True)


def past(
    trial: str,
    state: InvitationState,
    days_ago: int,
    reached: bool = True,
    changed_days_ago: int | None = None,
    id_: str | None = None,
) -> PastInvitation:
    return PastInvitation(
        id=id_ or f"inv-{trial}-{days_ago}",
        trial=trial,
        state=state,
        created_at=NOW - timedelta(days=days_ago),
        state_changed_at=NOW - timedelta(days=changed_days_ago or days_ago),
        reached_patient=reached,
    )


def rules_of(**overrides: object) -> set[Rule]:
    inp = RuleInput(
        trial=overrides.pop("trial", TRIAL),  # type: ignore[arg-type]
        site=overrides.pop("site", "RA3"),  # type: ignore[arg-type]
        patient=overrides.pop("patient", OK_PATIENT),  # type: ignore[arg-type]
        invitations=overrides.pop("invitations", ()),  # type: ignore[arg-type]
        usage=overrides.pop("usage", Usage()),  # type: ignore[arg-type]
        now=NOW,
    )
    assert not overrides
    return {h.rule for h in evaluate(inp, POLICY)}


def test_a_clean_candidate_is_not_held() -> None:
    assert rules_of() == set()


def test_opt_out_and_death_exclude_and_every_hold_is_reported() -> None:
    inp = RuleInput(
        TRIAL,
        "ZZ9",
        PatientView(known=True, research_opt_out=True, deceased=True),
        (),
        Usage(trial=10, site=0),
        NOW,
    )
    holds = evaluate(inp, POLICY)
    assert {h.rule for h in holds} == {
        Rule.RESEARCH_OPT_OUT,
        Rule.DECEASED,
        Rule.SITE_NOT_RECRUITING,
        Rule.TRIAL_CAPACITY,
    }
    assert excludes(holds)
    assert all(h.reason for h in holds)
    assert not excludes([h for h in holds if h.rule is Rule.TRIAL_CAPACITY])


def test_unknown_patient_and_inactive_trial_hold() -> None:
    paused = TrialView("t1", "paused", frozenset({"RA3"}))
    assert rules_of(patient=PatientView(known=False), trial=paused) == {
        Rule.PROFILE_MISSING,
        Rule.TRIAL_NOT_RECRUITING,
    }


def test_one_active_invitation_across_trials() -> None:
    open_elsewhere = past("t2", S.APPROVED, days_ago=3, reached=False)
    assert rules_of(invitations=[open_elsewhere]) == {Rule.ACTIVE_INVITATION}


def test_cooldown_after_a_decline_in_another_trial_then_lifts() -> None:
    declined = past("t2", S.DECLINED, days_ago=40, changed_days_ago=30)
    inp = RuleInput(TRIAL, "RA3", OK_PATIENT, [declined], Usage(), NOW)
    (hold,) = evaluate(inp, POLICY)
    assert hold.rule is Rule.COOLDOWN
    assert hold.until == declined.state_changed_at + timedelta(days=90)
    assert "declined trial t2" in hold.reason and "90 days" in hold.reason
    later = RuleInput(TRIAL, "RA3", OK_PATIENT, [declined], Usage(), hold.until)
    assert evaluate(later, POLICY) == ()


def test_yearly_cap_counts_invitations_across_trials_that_reached_the_patient() -> None:
    history = [
        past("t2", S.NO_RESPONSE, days_ago=300),
        past("t3", S.SCREEN_FAILED, days_ago=200),
        past("t4", S.ENROLLED, days_ago=100),
    ]
    inp = RuleInput(TRIAL, "RA3", OK_PATIENT, history, Usage(), NOW)
    (hold,) = evaluate(inp, POLICY)
    assert hold.rule is Rule.YEARLY_CAP and "3 invitations" in hold.reason
    # lifts when the oldest counted invitation leaves the 365-day window
    assert hold.until == NOW - timedelta(days=300) + timedelta(days=365)
    # invitations that never reached the patient do not count
    spared = [
        past("t2", S.REJECTED, days_ago=300, reached=False),
        past("t3", S.EXPIRED, days_ago=200, reached=False),
        past("t4", S.WITHDRAWN, days_ago=100, reached=False),
        past("t5", S.ENROLLED, days_ago=50),
    ]
    assert rules_of(invitations=spared) == set()
    # older than the window: not counted
    old = [past(f"t{i + 2}", S.NO_RESPONSE, days_ago=400 + i) for i in range(5)]
    assert rules_of(invitations=old) == set()


def test_previously_invited_to_the_same_trial() -> None:
    rejected = past("t1", S.REJECTED, days_ago=10, reached=False)
    assert rules_of(invitations=[rejected]) == {Rule.PREVIOUSLY_INVITED}
    withdrawn_early = past("t1", S.WITHDRAWN, days_ago=10, reached=False)
    assert rules_of(invitations=[withdrawn_early]) == set()
    withdrawn_late = past("t1", S.WITHDRAWN, days_ago=10, reached=True)
    assert Rule.PREVIOUSLY_INVITED in rules_of(invitations=[withdrawn_late])


def test_trial_and_site_capacity() -> None:
    assert rules_of(usage=Usage(trial=9, site=3)) == set()
    assert rules_of(usage=Usage(trial=10, site=3)) == {Rule.TRIAL_CAPACITY}
    assert rules_of(usage=Usage(trial=5, site=4)) == {Rule.SITE_CAPACITY}
    assert rules_of(site="RB1", usage=Usage(trial=5, site=40)) == set()  # RB1 has no site target
    unlimited = TrialView("t1", "active", frozenset({"RA3"}))
    assert rules_of(trial=unlimited, usage=Usage(trial=10_000, site=10_000)) == set()


# --------------------------------------------------------------------------- routing

GP1, GP2, NAMED, NURSE = (f"src|Practitioner|{n}" for n in ("gp1", "gp2", "named", "nurse"))


def test_routing_prefers_the_first_active_gp() -> None:
    directory = MemoryDirectory(active={GP1, GP2, NAMED, NURSE}, recruiters={"RA3": [NURSE]})
    found = route("RA3", [GP1, GP2], NAMED, directory)
    assert (found.practitioner, found.via) == (GP1, Via.GP)


def test_routing_skips_unknown_inactive_and_non_practitioner_gps() -> None:
    directory = MemoryDirectory(active={GP2, NAMED}, inactive={GP1})
    unknown = "src|Practitioner|never-seen"
    practice = "src|Organization|practice"
    found = route("RA3", [practice, unknown, GP1, GP2], NAMED, directory)
    assert found.practitioner == GP2


def test_routing_falls_back_to_named_recruiter_then_site_recruiter_then_nobody() -> None:
    directory = MemoryDirectory(active={NAMED, NURSE}, recruiters={"RA3": [NURSE]})
    assert route("RA3", [GP1], NAMED, directory).via is Via.NAMED_RECRUITER
    assert route("RA3", [GP1], "src|Practitioner|gone", directory).practitioner == NURSE
    assert route("RA3", [], None, directory).via is Via.SITE_RECRUITER
    nobody = route("RB1", [], None, directory)
    assert nobody.practitioner is None and nobody.via is Via.UNROUTED
    assert nobody.reason == "no clinician found for site RB1"


def test_trial_recruiter_marker_needs_the_text() -> None:
    nurse = RoleCode("http://snomed.info/sct", "224535009", "Registered nurse")
    assert not is_trial_recruiter([nurse])
    assert is_trial_recruiter([nurse], ["Research nurse - clinical trial recruiter"])
    assert is_trial_recruiter([RoleCode(None, None, "Clinical Trial Recruiter")])
    assert not is_trial_recruiter([RoleCode("x", "62247001", "General practitioner")], ["GP"])
