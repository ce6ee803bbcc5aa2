"""Device counters in the stream: each patient's contribution, kept per event in a Faust table.

The worker folds a patient's facts into :class:`~.store.PatientStore` and then calls
:meth:`DeviceContributions.on_changes`, which recomputes the patient's whole
:func:`~.devices.contribution` (exposures, outcomes, person-time and the provenance of each counter
key) from the patient's live resources and writes it to the ``devices`` table when it differs
from the value there. The table's changelog *is* the public, compacted topic
``concierge.device-contrib.v1`` keyed by patient pseudonym, so writing a value publishes it, and a
patient whose devices are all retracted gets a tombstone.

Nothing is incremented. The counters of the whole population are ``sum(contributions)``, and a
reader keeps them by applying ``diff(previous value, new value)`` per key
(:mod:`.monitor`), which is idempotent: a replayed or duplicated record gives a zero diff. After a
crash the worker rebuilds patient state up to the committed facts offset and re-handles what
follows, recomputing the same contributions, so nothing is lost or counted twice (DESIGN
invariant 2); retractions and corrections change the recomputed contribution, so counts move
back (invariant 3).

Configuration: ``CONCIERGE_DEVICE_OUTCOMES`` and ``CONCIERGE_DEVICE_CLASSES`` name JSON files of
outcome definitions and device classes (formats in
:func:`~.devices.outcome_definitions_from_json` and :func:`~.devices.device_classes_from_json`);
unset, the defaults of :mod:`.devices` apply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from infra.topics import DEVICES
from surveillance_stream.devices import (
    DEFAULT_DEVICE_CLASSES,
    DEFAULT_OUTCOMES,
    DeviceClass,
    OutcomeDefinition,
    contribution,
    device_classes_from_json,
    outcome_definitions_from_json,
)
from surveillance_stream.settings import SurveillanceSettings
from surveillance_stream.store import Change, PatientStore

if TYPE_CHECKING:
    from surveillance_stream.app import StreamApp

log = logging.getLogger(__name__)

__all__ = ["DeviceContributions", "install", "load_definitions"]


def load_definitions(
    section: SurveillanceSettings | None = None,
) -> tuple[tuple[OutcomeDefinition, ...], tuple[DeviceClass, ...]]:
    """Outcome definitions and device classes from the files the surveillance section names
    (``CONCIERGE_DEVICE_OUTCOMES`` / ``_CLASSES``; the environment's when none is given)."""
    section = section if section is not None else SurveillanceSettings()
    definitions: tuple[OutcomeDefinition, ...] = DEFAULT_OUTCOMES
    classes: tuple[DeviceClass, ...] = DEFAULT_DEVICE_CLASSES
    if section.device_outcomes is not None:
        definitions = outcome_definitions_from_json(
            orjson.loads(section.device_outcomes.read_bytes())
        )
    if section.device_classes is not None:
        classes = device_classes_from_json(orjson.loads(section.device_classes.read_bytes()))
    return definitions, classes


def _may_expose(entry: Mapping[str, Any] | None) -> bool:
    """Whether a resource version can make a patient exposed (a device-exposure fact, or a
    procedure naming a device): the gate for patients with no contribution yet."""
    if not entry:
        return False
    for fact in entry.get("facts") or ():
        if not isinstance(fact, Mapping):
            continue
        kind = fact.get("kind")
        if kind == "device_exposure" or (kind == "procedure" and fact.get("devices")):
            return True
    return False


class DeviceContributions:
    """Per patient, the device contribution last published (the ``devices`` table's value);
    recomputed after every change. The population's counters are their sum, kept by the
    monitor (:class:`~.devices.Counters`)."""

    def __init__(
        self,
        store: PatientStore,
        table: Any,
        definitions: Sequence[OutcomeDefinition] = DEFAULT_OUTCOMES,
        classes: Sequence[DeviceClass] = DEFAULT_DEVICE_CLASSES,
    ) -> None:
        self.store = store
        self.table = table  # patient -> contribution dict (with "partition"), absent if none
        self.definitions = tuple(definitions)
        self.classes = tuple(classes)
        #: patients with a published contribution, per partition (the gate's other half)
        self.exposed: dict[int, set[str]] = {}
        self.evaluations = 0
        self.writes = 0

    def value(self, partition: int, patient: str) -> dict[str, Any] | None:
        """The contribution the patient's current state gives, as the table stores it."""
        found = contribution(
            patient, self.store.view(partition, patient), self.definitions, classes=self.classes
        )
        if not found.keys and not found.person_time:
            return None
        value = found.to_dict()
        value["partition"] = partition
        return value

    def on_changes(self, partition: int, patient: str, changes: Iterable[Change]) -> None:
        exposed = self.exposed.setdefault(partition, set())
        if patient not in exposed and not any(
            _may_expose(change.new) or _may_expose(change.old) for change in changes
        ):
            return
        self.evaluations += 1
        new = self.value(partition, patient)
        old = self.table.get(patient)
        if new == old:
            return
        self.writes += 1
        if new is None:
            exposed.discard(patient)
            del self.table[patient]
        else:
            exposed.add(patient)
            self.table[patient] = new

    def recover(self, partition: int) -> None:
        """After the partition's patient state is rebuilt: which patients may contribute (the
        facts after the committed offset are handled again, recomputing theirs).

        The set is the table's patients of the partition, as :meth:`on_changes` keeps it while
        running (a patient is in it exactly while it has a published contribution). The table
        is complete here: the worker restores it from its topic before this hook runs
        (``StreamApp._verify_published``), so a patient Faust's own table recovery missed (the
        device integration test once saw the counters keep a dozen retracted outcome keys) is
        back. The patients held in memory with a resource that can make an exposure are added
        (a superset only costs evaluations); the patients only in the local checkpoint are not
        read: a restart reads what the facts after the checkpoint touch, not the history
        (:mod:`.store`).
        """
        exposed = {
            str(patient)
            for patient, value in list(self.table.items())
            if value and value.get("partition") == partition
        }
        for patient, entries in list(self.store.partitions.get(partition, {}).items()):
            if any(_may_expose(entry) for entry in entries.values()):
                exposed.add(patient)
        self.exposed[partition] = exposed

    def forget(self, partition: int) -> None:
        self.exposed.pop(partition, None)

    def summary(self) -> dict[str, Any]:
        """For ``/state/devices`` (admin only): with the exact number of exposed patients."""
        return {
            "exposed_patients": sum(len(v) for v in self.exposed.values()),
            **self.progress(),
        }

    def progress(self) -> dict[str, int]:
        """For ``/health`` (no token): work done, no count of patients."""
        return {"evaluations": self.evaluations, "writes": self.writes}


def install(stream: StreamApp) -> None:
    """The worker extension: the ``devices`` table, the contributions that fill it, their hooks
    and a health page."""
    settings = stream.settings
    definitions, classes = load_definitions()
    table = stream.published_table("devices", settings.topic(DEVICES))
    contributions = DeviceContributions(stream.store, table, definitions, classes)
    stream.devices = contributions
    stream.on_change.append(contributions.on_changes)
    stream.on_recover.append(contributions.recover)
    stream.on_forget.append(contributions.forget)

    @stream.admin_page("/state/devices")
    def devices_page(request: Any) -> tuple[Any, dict[str, Any]]:
        return contributions.summary(), {}

    log.info(
        "device counters on: %s outcome definitions, %s device classes",
        len(definitions),
        len(classes),
    )
