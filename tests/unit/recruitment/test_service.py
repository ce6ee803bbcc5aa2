"""The recruitment service on a real database (SQLite and PostgreSQL): rules, routing, lifecycle."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core.contracts.cohorts import CohortRecord
from core.contracts.facts import ReferenceRecord, ResourceFacts
from core.contracts.trials import OpaqueTrialRecord
from recruitment.lifecycle import IllegalTransition, InvitationState
from recruitment.models import (
    Candidate,
    CohortMembership,
    HoldRecord,
    Invitation,
    InvitationEvent,
    OutboxMessage,
    PatientProfile,
)
from recruitment.notify import MemoryChannel
from recruitment.runtime import Runtime, build_runtime
from recruitment.service import ConcurrentChange, counts_by_state
from recruitment.settings import RecruitmentSettings
from tests.recruitment_helpers import (
    BACKENDS,
    Clock,
    cohort,
    consent_facts,
    fresh_database,
    organization,
    patient_facts,
    practitioner,
    practitioner_key,
    recruiter_role,
    trial,
)

S = InvitationState
GP = practitioner_key("gp1")
NURSE = practitioner_key("nurse")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@dataclass
class Env:
    runtime: Runtime
    clock: Clock
    email: MemoryChannel

    def apply(self, *items: Any) -> None:
        """Apply messages in one transaction, as one consumer batch would."""
        with self.runtime.sessions.begin() as session:
            work = self.runtime.service.unit_of_work(session)
            for item in items:
                if isinstance(item, OpaqueTrialRecord):
                    work.trial(item.id, item)
                elif isinstance(item, CohortRecord):
                    work.cohort(item.trial, item.patient, item)
                elif isinstance(item, ResourceFacts):
                    work.facts(item)
                elif isinstance(item, ReferenceRecord):
                    work.reference(item)
                elif isinstance(item, tuple) and item[0] == "cohort-tombstone":
                    work.cohort(item[1], item[2], None)
                else:  # pragma: no cover - test helper misuse
                    raise TypeError(item)
            work.finish()

    def act(self, invitation_id: str, target: InvitationState, actor: str = "clinician:x") -> None:
        with self.runtime.sessions.begin() as session:
            service = self.runtime.service
            invitation = service.get_invitation(session, invitation_id, lock=True)
            service.transition(session, invitation, target, actor)

    def walk(self, invitation_id: str, *targets: InvitationState) -> None:
        for target in targets:
            self.act(invitation_id, target)

    def rows(self, model: Any, *where: Any) -> list[Any]:
        with self.runtime.sessions() as session:
            return list(session.scalars(sa.select(model).where(*where)))

    def invitation(self, patient: str, trial_id: str | None = None) -> Invitation:
        where = [Invitation.patient == patient]
        if trial_id:
            where.append(Invitation.trial_id == trial_id)
        found = self.rows(Invitation, *where)
        assert found, f"no invitation for {patient}"
        return max(found, key=lambda i: (i.active, i.created_at, i.state_changed_at))

    def candidate(self, trial_id: str, patient: str) -> Candidate:
        (found,) = self.rows(
            Candidate, Candidate.trial_id == trial_id, Candidate.patient == patient
        )
        return found

    def states(self) -> dict[tuple[str, str], str]:
        return {(i.trial_id, i.patient): i.state for i in self.rows(Invitation)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "candidates": sorted(
                (c.trial_id, c.patient, c.status, c.routed_to) for c in self.rows(Candidate)
            ),
            "invitations": sorted(
                (i.trial_id, i.patient, i.state, i.version) for i in self.rows(Invitation)
            ),
            "events": len(self.rows(InvitationEvent)),
            "outbox": len(self.rows(OutboxMessage)),
            "holds": len(self.rows(HoldRecord)),
        }


@pytest.fixture
def env(db_url: str) -> Iterator[Env]:
    clock = Clock()
    email = MemoryChannel()
    settings = RecruitmentSettings(
        url=db_url, app_base_url="https://concierge.example", cooldown_days=90, yearly_cap=3
    )
    runtime = build_runtime(settings, url=db_url, channels={"email": email}, clock=clock)
    yield Env(runtime, clock, email)
    runtime.close()


def base(*patients: str, **trial_kwargs: Any) -> list[Any]:
    """A trial at RA3, a GP, and the given patients registered with that GP."""
    items: list[Any] = [trial(**trial_kwargs), practitioner("gp1")]
    items += [patient_facts(p, gps=[GP]) for p in patients]
    return items


def test_cohort_entry_routes_to_the_gp_and_alerts_without_patient_details(env: Env) -> None:
    p1 = "p-65bc215fcb9821a0e9014679546c37ad"
    env.apply(*base(p1), cohort("t1", p1, 1))
    candidate = env.candidate("t1", p1)
    assert (candidate.status, candidate.routed_to, candidate.routing_via) == ("invited", GP, "gp")
    invitation = env.invitation(p1)
    assert invitation.state == "proposed" and invitation.practitioner == GP
    (alert,) = env.rows(OutboxMessage)
    assert (
        alert.kind == "alert" and alert.channel == "email" and alert.recipient == "gp1@nhs.example"
    )
    text = f"{alert.subject}\n{alert.body}\n{alert.payload}"
    assert invitation.id in text and "https://concierge.example/v1/clinician/invitations/" in text
    assert p1 not in text and p1[2:10] not in text  # no pseudonym, no identity

    report = env.runtime.dispatcher.run_once()
    assert report.delivered == 1 and len(env.email.sent) == 1
    assert env.invitation(p1).state == "sent_to_clinician"
    history = env.rows(InvitationEvent, InvitationEvent.invitation_id == invitation.id)
    assert [(e.from_state, e.to_state, e.actor) for e in history] == [
        (None, "proposed", "system:recruitment"),
        ("proposed", "sent_to_clinician", "system:notify"),
    ]


def test_replaying_messages_changes_nothing(env: Env) -> None:
    batch = [*base("p1", "p2"), cohort("t1", "p1", 1), cohort("t1", "p2", 1)]
    env.apply(*batch)
    before = env.snapshot()
    env.apply(*batch)
    env.apply(*reversed(batch))
    env.apply(cohort("t1", "p1", 1, member=False))  # same change counter: ignored
    assert env.snapshot() == before
    (membership,) = env.rows(CohortMembership, CohortMembership.patient == "p1")
    assert membership.member and membership.change == 1


def test_research_opt_out_blocks_and_withdraws_an_open_invitation(env: Env) -> None:
    env.apply(*base("p1", "p2"), consent_facts("p2"), cohort("t1", "p1", 1), cohort("t1", "p2", 1))
    # p2 opted out before entering the cohort: never a candidate, never counted, never routed
    excluded = env.candidate("t1", "p2")
    assert excluded.status == "excluded" and excluded.routed_to is None
    assert [h["rule"] for h in excluded.held_reasons] == ["research_opt_out"]
    assert not env.rows(Invitation, Invitation.patient == "p2")

    invitation = env.invitation("p1")
    env.walk(invitation.id, S.SENT_TO_CLINICIAN, S.APPROVED, S.PATIENT_CONTACTED)
    env.apply(consent_facts("p1"))  # opt-out mid-invitation, after contact: opt-outs win
    invitation = env.invitation("p1")
    assert invitation.state == "withdrawn" and not invitation.active
    last = env.rows(InvitationEvent, InvitationEvent.invitation_id == invitation.id)[-1]
    assert (last.actor, last.note) == ("system:opt-out", "research opt-out recorded")
    candidate = env.candidate("t1", "p1")
    assert candidate.status == "excluded"
    (profile,) = env.rows(PatientProfile, PatientProfile.pseudonym == "p1")
    assert profile.research_opt_out and profile.opt_out_changed_at is not None
    with env.runtime.sessions() as session:
        counts = counts_by_state(session, "t1")
    assert counts["withdrawn"] == 1 and counts["held"] == 0 and sum(counts.values()) == 1

    # the opt-out is lifted (the Consent becomes inactive): p1 was contacted, so no new invitation
    env.apply(consent_facts("p1", seq=2, status="inactive"))
    assert env.candidate("t1", "p1").status == "held"
    assert {h["rule"] for h in env.candidate("t1", "p1").held_reasons} == {"previously_invited"}
    env.apply(consent_facts("p2", seq=2, status="inactive"))
    assert env.invitation("p2").state == "proposed"


def test_cohort_exit_before_contact_withdraws_after_contact_does_not(env: Env) -> None:
    env.apply(*base("p1", "p2"), cohort("t1", "p1", 1), cohort("t1", "p2", 1))
    first, second = env.invitation("p1"), env.invitation("p2")
    env.walk(first.id, S.SENT_TO_CLINICIAN, S.APPROVED)
    env.walk(second.id, S.SENT_TO_CLINICIAN, S.APPROVED, S.PATIENT_CONTACTED)
    env.apply(cohort("t1", "p1", 2, member=False), ("cohort-tombstone", "t1", "p2"))
    assert env.invitation("p1").state == "withdrawn"
    assert env.candidate("t1", "p1").status == "withdrawn"
    assert env.invitation("p2").state == "patient_contacted"  # the clinician closes it
    # back in the cohort: withdrawn before contact, so a new invitation
    env.apply(cohort("t1", "p1", 3, member=True))
    assert env.candidate("t1", "p1").status == "invited"
    assert env.invitation("p1").state == "proposed" and env.invitation("p1").id != first.id


def test_capacity_stops_routing_and_a_freed_slot_is_used(env: Env) -> None:
    patients = ["p1", "p2", "p3", "p4"]
    env.apply(
        *base(*patients, target=3, site_targets={"RA3": 2}, sites=("RA3", "RB1")),
        *[patient_facts(p, gps=[GP], site="RB1") for p in ["p4"]],
        cohort("t1", "p1", 1),
        cohort("t1", "p2", 1),
        cohort("t1", "p3", 1),
        cohort("t1", "p4", 1, site="RB1"),
    )
    assert {p: env.candidate("t1", p).status for p in patients} == {
        "p1": "invited",
        "p2": "invited",
        "p3": "held",
        "p4": "invited",
    }
    held = env.candidate("t1", "p3")
    assert [h["rule"] for h in held.held_reasons] == ["site_capacity"]
    assert "RA3 has 2 enrolled or invited of its target 2" in held.held_reasons[0]["reason"]
    # enrolled keeps its slot; a rejection frees one, used in the same transaction
    env.walk(
        env.invitation("p1").id,
        S.SENT_TO_CLINICIAN,
        S.APPROVED,
        S.PATIENT_CONTACTED,
        S.INTERESTED,
        S.CONSENTED,
        S.ENROLLED,
    )
    # now the trial (p1 enrolled, p2 and p4 invited) and the site (p1, p2) are both full
    assert {h["rule"] for h in env.candidate("t1", "p3").held_reasons} == {
        "site_capacity",
        "trial_capacity",
    }
    env.walk(env.invitation("p2").id, S.SENT_TO_CLINICIAN, S.REJECTED)
    assert env.candidate("t1", "p3").status == "invited"
    holds = env.rows(HoldRecord, HoldRecord.patient == "p3")
    assert sorted((h.rule, h.released_at is not None) for h in holds) == [
        ("site_capacity", True),
        ("trial_capacity", True),
    ]
    with env.runtime.sessions() as session:
        counts = counts_by_state(session, "t1")
    assert (counts["enrolled"], counts["rejected"], counts["proposed"]) == (1, 1, 2)


def test_cooldown_and_yearly_cap_across_several_trials(env: Env) -> None:
    trials = [trial(f"t{i}", title=f"Trial {i}") for i in range(1, 6)]
    env.apply(practitioner("gp1"), patient_facts("p1", gps=[GP]), *trials)
    env.apply(*[cohort(f"t{i}", "p1", 1) for i in range(1, 6)])
    # one open invitation across all trials
    (open_one,) = env.rows(Invitation, Invitation.active.is_(True))
    assert open_one.trial_id == "t1"
    assert {h["rule"] for h in env.candidate("t2", "p1").held_reasons} == {"active_invitation"}

    # declined: cool-down for 90 days, everywhere
    env.walk(open_one.id, S.SENT_TO_CLINICIAN, S.APPROVED, S.PATIENT_CONTACTED, S.DECLINED)
    hold = env.candidate("t2", "p1").held_reasons
    assert [h["rule"] for h in hold] == ["cooldown"] and "declined trial t1" in hold[0]["reason"]
    env.clock.advance(days=89)
    env.runtime.service.reevaluate_open()
    assert not env.rows(Invitation, Invitation.active.is_(True))
    env.clock.advance(days=2)
    env.runtime.service.reevaluate_open()
    second = env.invitation("p1", "t2")
    assert second.state == "proposed"

    # two more invitations that reach the patient: the cap (3 per 365 days) is hit
    env.walk(second.id, S.SENT_TO_CLINICIAN, S.APPROVED, S.PATIENT_CONTACTED, S.NO_RESPONSE)
    third = env.invitation("p1", "t3")
    env.walk(third.id, S.SENT_TO_CLINICIAN, S.APPROVED, S.PATIENT_CONTACTED, S.NO_RESPONSE)
    assert not env.rows(Invitation, Invitation.active.is_(True))
    capped = env.candidate("t4", "p1").held_reasons
    assert [h["rule"] for h in capped] == ["yearly_cap"]
    assert "3 invitations in the last 365 days" in capped[0]["reason"]
    # the cap lifts when the first invitation leaves the window
    env.clock.advance(days=365 - 91 + 1)
    env.runtime.service.reevaluate_open()
    assert env.invitation("p1", "t4").state == "proposed"


def test_routing_falls_back_to_a_site_recruiter_when_it_arrives(env: Env) -> None:
    env.apply(trial(), patient_facts("p1", gps=["urn:test:ehr|Practitioner|unknown"]))
    env.apply(cohort("t1", "p1", 1))
    candidate = env.candidate("t1", "p1")
    assert candidate.status == "unrouted"
    assert candidate.held_reasons[0]["reason"] == "no clinician found for site RA3"
    env.apply(
        organization("trust", "RA3"),
        organization("ward", "RA3W1", part_of="trust"),
        practitioner("nurse"),
        recruiter_role("role-1", "nurse", "ward"),
    )
    candidate = env.candidate("t1", "p1")
    assert (candidate.status, candidate.routed_to, candidate.routing_via) == (
        "invited",
        NURSE,
        "site_recruiter",
    )


def test_unknown_patient_is_held_until_the_patient_record_arrives(env: Env) -> None:
    env.apply(trial(), practitioner("gp1"), cohort("t1", "p1", 1))
    assert [h["rule"] for h in env.candidate("t1", "p1").held_reasons] == ["profile_missing"]
    env.apply(patient_facts("p1", gps=[GP]))
    assert env.candidate("t1", "p1").routed_to == GP


def test_concurrent_approvals_exactly_one_wins(env: Env) -> None:
    env.apply(*base("p1"), cohort("t1", "p1", 1))
    invitation = env.invitation("p1")
    env.act(invitation.id, S.SENT_TO_CLINICIAN)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def approve() -> None:
        barrier.wait()
        try:
            env.act(invitation.id, S.APPROVED)
            outcomes.append("won")
        except IllegalTransition as exc:
            outcomes.append(f"illegal: {exc}")

    threads = [threading.Thread(target=approve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["illegal"] * 3 + ["won"]
    assert all("from approved" in o for o in outcomes if o != "won")
    approvals = env.rows(
        InvitationEvent,
        InvitationEvent.invitation_id == invitation.id,
        InvitationEvent.to_state == "approved",
    )
    assert len(approvals) == 1


def test_a_stale_version_is_refused(env: Env) -> None:
    env.apply(*base("p1"), cohort("t1", "p1", 1))
    invitation = env.invitation("p1")
    with env.runtime.sessions.begin() as session:
        current = env.runtime.service.get_invitation(session, invitation.id)
        env.runtime.service.transition(
            session, current, S.SENT_TO_CLINICIAN, "x", expected_version=current.version
        )
    with pytest.raises(ConcurrentChange), env.runtime.sessions.begin() as session:
        current = env.runtime.service.get_invitation(session, invitation.id)
        env.runtime.service.transition(
            session, current, S.APPROVED, "x", expected_version=invitation.version
        )


def test_stale_invitations_expire_and_free_their_slot(env: Env) -> None:
    env.apply(*base("p1", "p2", target=1), cohort("t1", "p1", 1), cohort("t1", "p2", 1))
    assert env.candidate("t1", "p2").status == "held"
    env.clock.advance(days=10)
    assert env.runtime.service.expire_stale(older_than=timedelta(days=30)) == 0
    env.clock.advance(days=21)
    assert env.runtime.service.expire_stale(older_than=timedelta(days=30)) == 1
    assert env.invitation("p1").state == "expired"
    assert env.candidate("t1", "p1").status == "closed"
    assert env.invitation("p2").state == "proposed"


def test_trial_versions_apply_once_and_retirement_withdraws(env: Env) -> None:
    env.apply(*base("p1"), cohort("t1", "p1", 1))
    env.apply(trial(version=1, status="retired"))  # not a newer version: ignored
    assert env.invitation("p1").state == "proposed"
    env.apply(trial(version=2, status="retired"))
    assert env.invitation("p1").state == "withdrawn"
    assert env.candidate("t1", "p1").status == "withdrawn"


def test_cohort_before_trial_makes_candidates_when_the_trial_arrives(env: Env) -> None:
    env.apply(practitioner("gp1"), patient_facts("p1", gps=[GP]), cohort("t1", "p1", 1))
    assert not env.rows(Candidate)
    env.apply(trial(sites=("RB1",)))  # not recruiting at the patient's site
    assert not env.rows(Candidate)
    env.apply(trial(version=2, sites=("RA3", "RB1")))
    assert env.candidate("t1", "p1").status == "invited"


def test_death_withdraws_and_excludes(env: Env) -> None:
    env.apply(*base("p1"), cohort("t1", "p1", 1))
    env.apply(patient_facts("p1", gps=[GP], seq=2, deceased=True))
    assert env.invitation("p1").state == "withdrawn"
    assert env.candidate("t1", "p1").status == "excluded"


def test_eligibility_hook_withdraws_candidates_before_contact(db_url: str) -> None:
    clock = Clock()
    eligible = {"p1": True, "p2": True}
    runtime = build_runtime(
        RecruitmentSettings(url=db_url),
        url=db_url,
        channels={},
        clock=clock,
        eligibility=lambda trial_id, patient, now: eligible[patient],
    )
    env = Env(runtime, clock, MemoryChannel())
    try:
        env.apply(*base("p1", "p2"), cohort("t1", "p1", 1), cohort("t1", "p2", 1))
        assert env.invitation("p1").state == "sent_to_clinician"  # no channel: app only
        eligible["p1"] = False
        assert runtime.service.reevaluate_open() == 1
        assert env.invitation("p1").state == "withdrawn"
        assert env.candidate("t1", "p2").status == "invited"
    finally:
        runtime.close()


def test_a_paused_trial_holds_candidates_and_resumes_without_withdrawing(env: Env) -> None:
    env.apply(*base("p1", "p2"), cohort("t1", "p1", 1))
    first = env.invitation("p1")
    env.apply(trial(version=2, status="paused"), cohort("t1", "p2", 1), cohort("t1", "p1", 2))
    assert env.invitation("p1").id == first.id and env.invitation("p1").active  # kept
    held = env.candidate("t1", "p2")
    assert held.status == "held"
    assert [h["rule"] for h in held.held_reasons] == ["trial_not_recruiting"]
    assert "t1 is paused" in held.held_reasons[0]["reason"]
    env.apply(trial(version=3, status="active"))
    assert env.candidate("t1", "p2").status == "invited"


def test_profiles_are_read_from_the_patient_view(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recruitment's site, region and GP come from the patient view's demographics (the rule
    every engine and counter uses), not from its own reading of the stored facts."""
    import dataclasses

    import recruitment.service as service_module

    env.apply(patient_facts("p1", site="RA3"))
    (profile,) = env.rows(PatientProfile, PatientProfile.pseudonym == "p1")
    assert (profile.site, profile.region) == ("RA3", "London")
    real = service_module.build_view

    def moved(patient: str, entries: Any) -> Any:
        view = real(patient, entries)
        assert view.demographics is not None
        demographics = dataclasses.replace(view.demographics, site="RB9", region=None)
        return dataclasses.replace(view, demographics=demographics)

    monkeypatch.setattr(service_module, "build_view", moved)
    env.apply(patient_facts("p1", site="RA3", seq=2))
    (profile,) = env.rows(PatientProfile, PatientProfile.pseudonym == "p1")
    assert (profile.site, profile.region) == ("RB9", None)


def test_the_latest_patient_version_sets_the_profile_and_unknown_is_no_region(env: Env) -> None:
    first = patient_facts("p1", site="RA3", seq=1)
    other = patient_facts("p1", site="RB9", seq=5)
    # a second Patient resource for the same pseudonym, updated earlier than the first
    older = other.model_copy(
        update={
            "key": other.key.replace("pat-p1", "pat-p1-other"),
            "provenance": first.provenance.model_copy(
                update={"last_updated": first.provenance.last_updated - timedelta(days=1)}
            ),
            "facts": (other.facts[0].model_copy(update={"region": "Unknown"}),),
        }
    )
    env.apply(first, older)
    (profile,) = env.rows(PatientProfile, PatientProfile.pseudonym == "p1")
    assert (profile.site, profile.region) == ("RA3", "London")
    newer = older.model_copy(
        update={
            "seq": 6,
            "provenance": first.provenance.model_copy(
                update={"last_updated": first.provenance.last_updated + timedelta(days=1)}
            ),
        }
    )
    env.apply(newer)
    (profile,) = env.rows(PatientProfile, PatientProfile.pseudonym == "p1")
    assert (profile.site, profile.region) == ("RB9", None)
