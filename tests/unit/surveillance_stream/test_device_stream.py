"""The worker's per-patient device contributions (``surveillance_stream.device_stream``) with
an in-memory table; ``tests/integration/test_device_signals.py`` runs it in a real worker."""

from __future__ import annotations

from typing import Any

from surveillance_stream.device_stream import DeviceContributions
from surveillance_stream.devices import ICD10, SNOMED, contribution
from surveillance_stream.store import PatientStore
from tests.generative.test_device_counters import SRC, envelope

HIP = "304120007"
DESCRIPTION = {"device": f"{SRC}|Device|d1", "type_codes": [{"system": SNOMED, "code": HIP}],
               "manufacturer": "Acme", "model": "M-A", "lot": "L1", "udi": None}  # fmt: skip
DEVICE = [{"kind": "device_exposure", "status": "active", "start": "2023-02-01T00:00:00+00:00",
           "end": None, "source": "use_statement", "device": DESCRIPTION}]  # fmt: skip
EVENT = [{"kind": "adverse_event", "codes": [{"system": ICD10, "code": "T84.0"}],
          "actuality": "actual", "date": "2023-06-01T00:00:00+00:00",
          "suspect_devices": [DEVICE[0]["device"]]}]  # fmt: skip
OTHER = [{"kind": "condition", "codes": [{"system": ICD10, "code": "I10"}],
          "onset": "2023-03-01T00:00:00+00:00", "abatement": None, "recorded": None,
          "verification_status": "confirmed"}]  # fmt: skip


def feed(
    store: PatientStore, contributions: DeviceContributions, patient: str, *parts: Any
) -> None:
    rtype, rid, seq, facts = parts
    change = store.apply(0, envelope(patient, rtype, rid, seq, facts))
    contributions.on_changes(0, patient, [change])


def test_contributions_are_written_when_they_change_and_tombstoned_when_gone() -> None:
    store, table = PatientStore(), {}
    store.install(0, {})
    contributions = DeviceContributions(store, table)
    feed(store, contributions, "pa", "Condition", "c0", 1, OTHER)  # no device: not even evaluated
    assert contributions.evaluations == 0 and "pa" not in table
    feed(store, contributions, "pa", "DeviceUseStatement", "u1", 1, DEVICE)
    feed(store, contributions, "pa", "AdverseEvent", "a1", 1, EVENT)
    assert table["pa"]["keys"] == [list(k) for k in contribution("pa", store.patient(0, "pa")).keys]
    writes = contributions.writes
    feed(store, contributions, "pa", "AdverseEvent", "a1", 1, EVENT)  # a duplicate: nothing written
    assert contributions.writes == writes
    feed(store, contributions, "pa", "DeviceUseStatement", "u1", 2, None)  # device retracted
    assert "pa" not in table and "pa" not in contributions.exposed[0]


def test_after_a_restart_retractions_of_outcomes_still_move_the_contribution() -> None:
    store, table = PatientStore(), {}
    store.install(0, {})
    contributions = DeviceContributions(store, table)
    feed(store, contributions, "pa", "DeviceUseStatement", "u1", 1, DEVICE)
    feed(store, contributions, "pa", "AdverseEvent", "a1", 1, EVENT)
    with_event = table["pa"]
    # restart: the patient state is rebuilt, but the table is not (yet) restored
    restarted = DeviceContributions(store, {})
    restarted.recover(0)
    assert "pa" in restarted.exposed[0]
    feed(store, restarted, "pa", "AdverseEvent", "a1", 2, None)  # the outcome retracted
    assert restarted.table["pa"] != with_event
    assert restarted.table["pa"]["keys"] == [
        list(k) for k in contribution("pa", store.patient(0, "pa")).keys
    ]
    assert not [k for k in restarted.table["pa"]["keys"] if k[2] == "adverse event"]
