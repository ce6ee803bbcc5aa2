"""The batched routing path against the row-at-a-time one (hypothesis).

:class:`recruitment.service.UnitOfWork` routes a batch from memory (reads in bulk, rules against
in-memory per-patient and per-trial state, bulk writes); ``batched=False`` is the old path, one
query per read and a flush per insert. Over generated sequences of batches (trials with and
without targets, cohort entries and exits, patients with and without a GP, opt-outs, deaths,
clinician moves and time passing), both must leave the same database: candidates, holds,
invitations, events and outbox rows, ids aside.

The batch boundaries are the same on both sides: applying a batch as one transaction is not
meant to equal one transaction per message (an opt-out later in the same batch stops an
invitation from being made at all, where a transaction per message makes it, then withdraws it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.contracts.cohorts import CohortRecord
from core.contracts.facts import ReferenceRecord, ResourceFacts
from core.contracts.trials import OpaqueTrialRecord
from recruitment.lifecycle import TRANSITIONS, InvitationState
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
from recruitment.service import UnitOfWork
from recruitment.settings import RecruitmentSettings
from tests.recruitment_helpers import (
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

PATIENTS = ("p1", "p2", "p3", "p4", "p5")
TRIALS = ("t1", "t2", "t3")
SITES = ("RA3", "RB1")
GPS = (practitioner_key("gp1"), practitioner_key("gp2"), practitioner_key("nomail"))


def reference() -> list[Any]:
    """GPs with e-mail, one without any channel (its invitations go straight to the clinician
    app), and a trial recruiter at RA3 only (RB1 patients without a GP stay unrouted)."""
    return [
        practitioner("gp1"),
        practitioner("gp2"),
        practitioner("nurse"),
        organization("org-ra3", "RA3"),
        recruiter_role("role-1", "nurse", "org-ra3"),
    ]


@st.composite
def messages(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["cohort", "cohort", "cohort", "exit", "trial", "patient", "opt"]))
    patient = draw(st.sampled_from(PATIENTS))
    trial_id = draw(st.sampled_from(TRIALS))
    if kind == "cohort":
        return ("cohort", trial_id, patient, draw(st.sampled_from(SITES)))
    if kind == "exit":
        return ("exit", trial_id, patient)
    if kind == "trial":
        sites = draw(st.lists(st.sampled_from(SITES), min_size=1, max_size=2, unique=True))
        target = draw(st.one_of(st.none(), st.integers(1, 3)))
        site_target = draw(st.one_of(st.none(), st.integers(1, 2)))
        status = draw(st.sampled_from(["active", "active", "active", "paused", "completed"]))
        return ("trial", trial_id, tuple(sites), target, site_target, status)
    if kind == "patient":
        gps = draw(st.lists(st.sampled_from(GPS), max_size=2, unique=True))
        deceased = draw(st.booleans()) and draw(st.booleans())
        return ("patient", patient, tuple(gps), draw(st.sampled_from(SITES)), deceased)
    return ("opt", patient, draw(st.booleans()))


@st.composite
def setup(draw: st.DrawFn) -> Any:
    """A first batch that makes routing likely: every trial recruiting (targets drawn), every
    patient known (GPs drawn), and some cohort entries."""
    batch: list[Any] = [
        ("trial", t, SITES, draw(st.one_of(st.none(), st.integers(1, 3))),
         draw(st.one_of(st.none(), st.integers(1, 2))), "active")
        for t in TRIALS
    ]  # fmt: skip
    batch += [
        ("patient", p, tuple(draw(st.lists(st.sampled_from(GPS), max_size=2, unique=True))),
         draw(st.sampled_from(SITES)), False)
        for p in PATIENTS
    ]  # fmt: skip
    batch += draw(st.lists(messages(), max_size=12))
    return ("batch", batch)


steps = st.lists(
    st.one_of(
        st.lists(messages(), min_size=1, max_size=12).map(lambda batch: ("batch", batch)),
        st.tuples(st.just("act"), st.sampled_from(PATIENTS), st.integers(0, 5)),
        st.tuples(st.just("wait"), st.integers(1, 200)),
    ),
    min_size=1,
    max_size=10,
)


class Run:
    """One database, fed through units of work of one kind."""

    def __init__(self, url: str, batched: bool) -> None:
        self.clock = Clock()
        self.batched = batched
        self.counters: dict[Any, int] = {}
        settings_ = RecruitmentSettings(
            url=url, app_base_url="https://concierge.example", cooldown_days=90, yearly_cap=2
        )
        self.runtime: Runtime = build_runtime(
            settings_, url=url, channels={"email": MemoryChannel()}, clock=self.clock
        )
        self.apply(reference())

    def close(self) -> None:
        self.runtime.close()

    def work(self, session: Any) -> UnitOfWork:
        return UnitOfWork(self.runtime.service, session, batched=self.batched)

    def next(self, key: Any) -> int:
        self.counters[key] = self.counters.get(key, 0) + 1
        return self.counters[key]

    def build(self, message: Any) -> Any:
        kind = message[0]
        if kind == "cohort":
            _, trial_id, patient, site = message
            return cohort(trial_id, patient, self.next(("c", trial_id, patient)), site=site)
        if kind == "exit":
            _, trial_id, patient = message
            return cohort(trial_id, patient, self.next(("c", trial_id, patient)), member=False)
        if kind == "trial":
            _, trial_id, sites, target, site_target, status = message
            targets = {sites[0]: site_target} if site_target is not None else None
            return trial(trial_id, self.next(("t", trial_id)), sites=sites, target=target,
                         site_targets=targets, status=status)  # fmt: skip
        if kind == "patient":
            _, patient, gps, site, deceased = message
            return patient_facts(patient, gps=gps, site=site, seq=self.next(("p", patient)),
                                 deceased=deceased)  # fmt: skip
        _, patient, opt_out = message
        return consent_facts(patient, opt_out=opt_out, seq=self.next(("o", patient)))

    def apply(self, items: list[Any]) -> None:
        with self.runtime.sessions.begin() as session:
            work = self.work(session)
            work.prefetch_cohort(
                [(i.trial, i.patient) for i in items if isinstance(i, CohortRecord)]
            )
            for item in items:
                if isinstance(item, OpaqueTrialRecord):
                    work.trial(item.id, item)
                elif isinstance(item, CohortRecord):
                    work.cohort(item.trial, item.patient, item)
                elif isinstance(item, ResourceFacts):
                    work.facts(item)
                elif isinstance(item, ReferenceRecord):
                    work.reference(item)
            work.finish()

    def act(self, patient: str, choice: int) -> None:
        """Move the patient's open invitation, if any, one step (the ``choice``-th legal one)."""
        with self.runtime.sessions.begin() as session:
            found = session.scalars(
                sa.select(Invitation).where(
                    Invitation.patient == patient, Invitation.active.is_(True)
                )
            ).first()
            if found is None:
                return
            options = TRANSITIONS[InvitationState(found.state)]
            target = options[choice % len(options)]
            work = self.work(session)
            self.runtime.service.transition(session, found, target, "clinician:x", work=work)
            work.finish()

    def play(self, plan: list[Any]) -> None:
        for step in plan:
            if step[0] == "batch":
                self.apply([self.build(m) for m in step[1]])
            elif step[0] == "act":
                self.act(step[1], step[2])
            else:
                self.clock.advance(days=step[1])

    def state(self) -> dict[str, Any]:
        """Every routing table, with uuids replaced by stable names."""
        with self.runtime.sessions() as session:
            invitations = list(
                session.scalars(
                    sa.select(Invitation).order_by(
                        Invitation.trial_id, Invitation.patient, Invitation.created_at
                    )
                )
            )
            names = {i.id: f"inv-{n}" for n, i in enumerate(invitations)}
            candidates = {
                c.id: (c.trial_id, c.patient) for c in session.scalars(sa.select(Candidate))
            }

            def plain(text: Any) -> Any:
                if isinstance(text, str):
                    for uuid_, name in names.items():
                        text = text.replace(uuid_, name)
                return text

            def row(obj: Any, drop: tuple[str, ...] = ()) -> tuple[Any, ...]:
                values = []
                for column in obj.__table__.columns:
                    if column.key in drop:
                        continue
                    value = getattr(obj, column.key)
                    if column.key == "candidate_id":
                        value = candidates[value]
                    elif column.key in ("invitation_id",) or (
                        column.key == "id" and value in names
                    ):
                        value = names.get(value, value)
                    elif isinstance(value, dict):
                        value = repr(
                            sorted((k, plain(v)) for k, v in value.items() if k not in ("id",))
                        )
                    elif isinstance(value, list):
                        value = repr(value)
                    values.append((column.key, repr(plain(value))))
                return tuple(values)

            return {
                "memberships": sorted(row(m) for m in session.scalars(sa.select(CohortMembership))),
                "profiles": sorted(row(p) for p in session.scalars(sa.select(PatientProfile))),
                "candidates": sorted(
                    row(c, ("id",)) for c in session.scalars(sa.select(Candidate))
                ),
                "holds": sorted(row(h, ("id",)) for h in session.scalars(sa.select(HoldRecord))),
                "invitations": sorted(row(i) for i in invitations),
                "events": sorted(
                    row(e, ("id",)) for e in session.scalars(sa.select(InvitationEvent))
                ),
                "outbox": sorted(
                    row(o, ("id",)) for o in session.scalars(sa.select(OutboxMessage))
                ),
            }


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[Any]:
    """A factory of fresh SQLite databases (two per example)."""
    made: list[Any] = []

    def make() -> str:
        context = fresh_database("sqlite", tmp_path)
        made.append(context)
        return context.__enter__()

    yield make
    for context in made:
        context.__exit__(None, None, None)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(first=setup(), rest=steps)
def test_batched_routing_leaves_the_database_the_row_at_a_time_path_leaves(
    databases: Any, first: Any, rest: list[Any]
) -> None:
    plan = [first, *rest]
    runs = [Run(databases(), batched=True), Run(databases(), batched=False)]
    try:
        for run in runs:
            run.play(plan)
        batched, reference_ = (run.state() for run in runs)
        for table in batched:
            assert batched[table] == reference_[table], table
    finally:
        for run in runs:
            run.close()
