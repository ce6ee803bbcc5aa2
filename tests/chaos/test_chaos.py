"""The chaos suite: SIGKILL the worker, the API, the recruitment service and the broker at random
moments under a bounded load through ``/fhir``, restart each, and check after every recovery
that the system equals a batch fold of the log (``oracle.py``) and that no reader answered from a
stale view (``probe.py``).

Each failure reported from the field is a named case here, then the random run draws
``CHAOS_FAULTS`` faults (10 by default; ``scripts/chaos.sh --long`` runs 50) from
``CHAOS_SEED``. One deployment serves the whole module; each case resumes the load, injects its
fault, waits until every process says it is ready, pauses the load and checks everything.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from feasibility.criteria import Question, parse_question
from fhir_adapters.synthetic.generator import GeneratorConfig, iter_reference_resources
from infra.topics import COHORT, DEVICES, FACTS
from surveillance_stream.app import PARTITIONS
from surveillance_stream.store import canonical

from .load import Load, requests_of
from .oracle import (
    Truth,
    cohort_on_topic,
    cohort_record,
    device_contributions_on_topic,
    device_counters_on_topic,
    device_history,
    eventually,
)
from .probe import Probe
from .stack import SOURCE, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]

# 8: each of the four kinds twice (scripts/chaos.sh; --long asks for 50). The README's test
# command (scripts/test.sh) asks for 4, each kind once, to keep CI under its 30 minutes.
FAULTS = int(os.environ.get("CHAOS_FAULTS", "8"))
SEED = int(os.environ.get("CHAOS_SEED", "20261201"))
RATE = float(os.environ.get("CHAOS_RATE", "60"))
PATIENTS = int(os.environ.get("CHAOS_PATIENTS", str(max(2500, FAULTS * 120))))
TRIAL = "chaos-hba1c"
CRITERIA: dict[str, Any] = {
    "schema": "concierge.criteria/1",
    "title": "Adults with an HbA1c of 48 mmol/mol or more",
    "index_date": "2026-01-01",
    "inclusion": [
        {"type": "age", "min": 18},
        {"type": "observation", "codes": [{"concept": "hba1c"}],
         "value": {"ge": 48, "unit": "mmol/mol"}},
    ],
}  # fmt: skip


@dataclass
class World:
    stack: Stack
    load: Load
    probe: Probe
    question: Question
    sponsor: dict[str, str]
    admin: dict[str, str]
    checks: int = 0
    faults: int = 0

    @property
    def bootstrap(self) -> str:
        return self.stack.broker.bootstrap

    def run_load(self, seconds: float) -> None:
        self.load.resume()
        time.sleep(seconds)

    def warm_up(self, timeout: float = 120) -> None:
        """Run the load until the batch fold's cohort has a member: a check over an empty cohort
        proves nothing, and a test run on its own (``-k``) starts from an empty log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.run_load(3)
            self.load.pause()
            truth = Truth.read(self.bootstrap, FACTS)
            if truth.cohort(self.question, datetime.now(UTC)):
                return
        raise AssertionError(f"no cohort member after {timeout:.0f} s of load")

    def recover(self, timeout: float = 180) -> None:
        """Wait until every process says it is ready (the load keeps flowing meanwhile)."""
        self.stack.wait_ready(timeout)

    def check(self) -> Truth:
        """Pause the load, then everything must equal the batch fold of the log."""
        self.load.pause()
        truth = Truth.read(self.bootstrap, FACTS)
        assert truth.envelopes, "an empty log proves nothing"
        assert truth.conflicting_duplicates() == []
        pseudonyms = self.load.pseudonyms
        assert truth.missing_acknowledged(self.load.ledger, SOURCE, pseudonyms) == []
        assert truth.phantoms(self.load.ledger, SOURCE, pseudonyms) == []
        want_digest = truth.digest()
        members = truth.cohort(self.question, datetime.now(UTC))
        assert members, "an empty cohort proves nothing"
        counters = truth.counters()

        def worker_state() -> Any:
            got = httpx.get(
                f"{self.stack.worker}/state/digest", headers=self.admin, timeout=30
            ).json()
            return True if got == want_digest else (got, want_digest)

        def state_difference() -> list[str]:
            """Which entries the worker lacks or has wrong, with where they are on the log."""
            where = truth.where()
            out = []
            for patient, entries in sorted(truth.patients().items()):
                page = httpx.get(
                    f"{self.stack.worker}/state/patients/{patient}", headers=self.admin, timeout=10
                )
                held = page.json()["resources"]
                for key, entry in entries.items():
                    if held.get(key) != canonical(entry):
                        out.append(f"{key} seq {entry['seq']} at {where.get(key)}: {held.get(key)}")
            return out[:20]

        def live_cohort() -> Any:
            got = cohort_on_topic(self.bootstrap, COHORT, TRIAL, 1)
            if got == set(members):
                return True
            where = truth.where()
            fold = truth.patients()
            detail = {}
            for patient in sorted(got ^ set(members))[:5]:
                detail[patient] = {
                    "expected": patient in members,
                    "record": cohort_record(self.bootstrap, COHORT, TRIAL, patient),
                    "resources": {
                        k.rsplit("|", 2)[-2]: (e["seq"], where.get(k))
                        for k, e in fold[patient].items()
                    },
                }
            return (len(got), len(members), detail)

        def api_live_cohort() -> Any:
            response = httpx.get(
                f"{self.stack.api}/v1/admin/saved-questions/{TRIAL}/live", headers=self.admin
            )
            got = response.json().get("members") if response.status_code == 200 else response
            return True if got == len(members) else (got, len(members))

        def devices() -> Any:
            got = device_counters_on_topic(self.bootstrap, DEVICES)
            if got == counters:
                return True
            published = {
                p: c for p, c in device_contributions_on_topic(self.bootstrap, DEVICES).items() if c
            }
            batch = truth.contributions()
            where = truth.where()
            fold = truth.patients()
            differ = sorted(p for p in set(published) | set(batch)
                            if published.get(p) != batch.get(p))  # fmt: skip
            history = device_history(self.bootstrap, DEVICES, set(differ[:4]))
            return {
                p: {
                    "published": published.get(p) is not None,
                    "batch": batch.get(p) is not None,
                    "topic": history.get(p),
                    "worker": httpx.get(
                        f"{self.stack.worker}/state/devices", headers=self.admin, timeout=10
                    ).json(),
                    "resources": {
                        k.rsplit("|", 2)[-2]: (e["seq"], where.get(k))
                        for k, e in fold.get(p, {}).items()
                    },
                }
                for p in differ[:4]
            }

        def ad_hoc() -> Any:
            response = httpx.post(
                f"{self.stack.api}/v1/feasibility/ask", json=CRITERIA, headers=self.sponsor
            )
            if response.status_code != 200:
                return (response.status_code, response.text[:300])
            got = response.json()["total"]["value"]
            return True if got == len(members) else (got, len(members))

        def saved_answer() -> Any:
            response = httpx.get(
                f"{self.stack.api}/v1/feasibility/saved-questions/{TRIAL}/answer",
                headers=self.sponsor,
            )
            if response.status_code != 200:
                return (response.status_code, response.text[:300])
            body = response.json()
            got = body["total"]["value"]
            agree = body["stream_and_snapshot_agree"]
            return True if got == len(members) and agree else (got, len(members), agree)

        try:
            eventually(worker_state, 120, "worker state == fold of the facts topic")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nwhat differs: {state_difference()}") from None
        eventually(live_cohort, 90, "cohort topic == reference engine on the fold")
        eventually(api_live_cohort, 60, "API's cohort view == reference engine on the fold")
        eventually(devices, 90, "device contributions == batch contributions")
        eventually(ad_hoc, 60, "API ad hoc answer == reference engine on the fold")
        eventually(saved_answer, 60, "saved answer == reference engine, stream and snapshot agree")
        # The reported symptom: /state/patients/{p} empty for members after a restart.
        fold = truth.patients()
        for patient in sorted(members)[:30]:
            page = httpx.get(
                f"{self.stack.worker}/state/patients/{patient}", headers=self.admin, timeout=10
            ).json()
            assert page["resources"] == {k: canonical(v) for k, v in fold[patient].items()}
        assert self.probe.violations() == []
        self.checks += 1
        return truth


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("chaos")
    stack = Stack(root).start()
    config = GeneratorConfig(patients=PATIENTS, seed=SEED % 1000, sites=6, history_years=3)
    source = stack.token("source", "chaos-ehr")
    sponsor = stack.token("sponsor", "Chaos Pharma")
    references = [[("PUT", r["resourceType"], r["id"], r) for r in
                   iter_reference_resources(config)]]  # fmt: skip
    load = Load(stack.api, source, references + requests_of(config, SEED), rate=RATE, source=SOURCE)
    created = httpx.post(
        f"{stack.api}/v1/feasibility/saved-questions",
        json={"id": TRIAL, "title": "chaos", "criteria": CRITERIA, "recruiting_sites": []},
        headers=sponsor,
    )
    assert created.status_code == 201, created.text
    probe = Probe(stack.api, stack.broker.bootstrap, FACTS, sponsor, CRITERIA, TRIAL).start()
    world = World(
        stack, load.start(), probe, parse_question(CRITERIA), sponsor,
        stack.token("admin", "site-ops"),
    )  # fmt: skip
    try:
        yield world
    finally:
        load.stop()
        probe.stop()
        stack.stop()
        summary = (
            f"chaos: {world.faults} faults, {world.checks} checks, {load.sent} requests "
            f"{dict(load.ledger.statuses)}, answers {probe.summary()}"
        )
        (root / "summary.txt").write_text(summary)
        print(summary)


# ---------------------------------------------------------------------- the reported failures


def test_worker_killed_under_load_rebuilds_the_state_its_offsets_reflect(world: World) -> None:
    """Reported: after kill -9 and a restart under load the worker logged ``rebuilt: 0 patients
    from 0 envelopes (to offset 0)`` and resumed from the committed offsets with an empty state."""
    world.run_load(8)
    world.stack.services["worker"].kill()
    world.faults += 1
    # the dead worker commits nothing more: what its group has committed now is what the new
    # one must rebuild each partition to (a partition may rightly be empty at offset 0)
    committed = committed_offsets(world.bootstrap, FACTS, WORKER_GROUP)
    assert sum(committed.values()) > 0, committed
    world.stack.services["worker"].start()  # at once: the killed member is still in the group
    world.run_load(3)
    world.recover()
    world.check()
    log = world.stack.services["worker"].log_path.read_text()
    last_start = log.rsplit("===== start", 1)[-1]
    rebuilt: dict[int, int] = {}
    for match in REBUILT.finditer(last_start):
        rebuilt.setdefault(int(match["partition"]), int(match["offset"]))
    assert set(rebuilt) == set(committed), (rebuilt, committed)
    short = {p: (rebuilt[p], c) for p, c in committed.items() if rebuilt[p] < c}
    assert not short, f"rebuilt short of the committed offsets (p: (rebuilt, committed)): {short}"


#: The worker's log line for a partition's rebuild, from offset 0 or from a local checkpoint:
#: ``partition 3 rebuilt: 12 patients, 40 envelopes read from offset 0 (no checkpoint) to
#: offset 40 in 0.2 s`` (the part in brackets says whether a checkpoint was loaded or why not).
REBUILT = re.compile(
    r"partition (?P<partition>\d+) rebuilt: \d+ patients, \d+ envelopes read from offset \d+ "
    r"\(.*?\) to offset (?P<offset>\d+) in "
)
#: The worker's consumer group (``CONCIERGE_WORKER_ID``'s default; the stack sets no prefix).
WORKER_GROUP = "concierge-stream"


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (0 where it has none)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30
        )
    finally:
        consumer.close()
    return {tp.partition: max(tp.offset, 0) for tp in found}


def test_broker_restart_does_not_freeze_the_snapshot(world: World) -> None:
    """Reported: the API's facts feed died for good on a broker restart while its status said
    ``caught_up: true``; ad hoc answers froze and the saved answer answered 500."""
    world.run_load(4)
    world.stack.kill_broker()
    world.faults += 1
    deadline = time.monotonic() + 15
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{world.stack.api}/readyz", timeout=10).json()
        if not status["ready"]:
            break
        time.sleep(0.5)
    assert status and not status["ready"], "the API said it was ready with the broker down"
    time.sleep(2)
    world.stack.start_broker()
    world.recover()
    world.check()


def test_api_answers_quickly_during_a_broker_outage(world: World) -> None:
    """Reported: no request completed for ~20 s while the broker was down (/healthz 19.9 s), and
    every ingest PUT then answered 201."""
    world.run_load(3)
    world.stack.kill_broker()
    world.faults += 1
    try:
        started = time.monotonic()
        health = [httpx.get(f"{world.stack.api}/healthz", timeout=10) for _ in range(5)]
        took = time.monotonic() - started
        assert all(r.status_code == 200 for r in health)
        assert took < 5, f"/healthz took {took:.1f} s for 5 calls during the outage"
        patient = {
            "resourceType": "Patient",
            "id": "outage-probe",
            "meta": {"versionId": "1"},
            "gender": "female",
            "birthDate": "1970-01-01",
        }
        started = time.monotonic()
        put = httpx.put(
            f"{world.stack.api}/fhir/Patient/outage-probe",
            json=patient,
            headers={**world.load.headers},
            timeout=30,
        )
        took = time.monotonic() - started
        assert put.status_code == 503, put.text
        assert put.headers.get("Retry-After")
        # The load keeps sending during the outage, so the probe first waits its turn at the
        # ingestor (at most the 5 s ingest timeout, then 503 "busy") and then its own publish
        # (at most the timeout again): the bound is twice the timeout plus slack. CI stop 26
        # saw 9.2 s. One deadline for both is an open item (docs: README, the ingest timeout).
        assert took < 12, f"the refusal took {took:.1f} s"
    finally:
        world.stack.start_broker()
    world.recover()
    world.check()


def test_a_restarted_api_answers_503_or_current_never_500(world: World) -> None:
    """Reported: a just-started API answered ``0 eligible`` from a snapshot 599 messages behind,
    and the saved answer answered 500 when the stream's cohort held a patient the snapshot had
    not read yet (the demo then crashed)."""
    world.run_load(4)
    world.stack.services["api"].kill()
    world.faults += 1
    world.stack.services["api"].start()
    world.run_load(6)
    world.recover()
    world.check()  # includes the probe's contract: every answer 503 or current, none 500
    assert any(a.status == 200 for a in world.probe.answers)


def test_recruitment_service_killed_under_load_recovers(world: World) -> None:
    world.run_load(4)
    world.stack.services["recruitment"].kill()
    world.faults += 1
    world.stack.services["recruitment"].start()
    world.recover()
    world.check()


# ---------------------------------------------------------------------- faults at random


def plan(faults: int, rng: random.Random) -> list[str]:
    """``faults`` kinds in random order, each kind at least twice when there is room."""
    kinds = ["worker", "api", "recruitment", "broker"]
    drawn = (kinds * 2)[:faults] + [rng.choice(kinds) for _ in range(faults - 2 * len(kinds))]
    rng.shuffle(drawn)
    return drawn


# about a minute a fault on a quiet machine; a loaded one (load average 10-15) managed 40 in an
# hour, so the bound grows with the faults asked for
@pytest.mark.timeout(max(3600, FAULTS * 180))
def test_random_faults_under_load(world: World) -> None:
    rng = random.Random(SEED)
    world.warm_up()
    for kind in plan(FAULTS, rng):
        world.run_load(rng.uniform(1.0, 6.0))
        if kind == "broker":
            world.stack.kill_broker()
            time.sleep(rng.uniform(0.5, 4.0))
            world.stack.start_broker()
        else:
            service = world.stack.services[kind]
            service.kill()
            time.sleep(rng.choice([0.0, 0.0, rng.uniform(0.5, 3.0)]))
            service.start()
        world.faults += 1
        world.run_load(rng.uniform(0.5, 3.0))
        world.recover()
        world.check()
    assert world.checks >= FAULTS


def test_after_every_fault_nothing_was_lost_or_stale(world: World) -> None:
    """The last word: one more check, and the run's totals for the record."""
    truth = world.check()
    assert world.faults >= FAULTS + 5
    assert len(world.load.ledger.acked) > 1000
    print(
        f"chaos totals: {world.faults} faults, {world.checks} checks, {len(truth.raw)} envelopes "
        f"({truth.exact_duplicates()} exact repeats, none conflicting)"
    )
