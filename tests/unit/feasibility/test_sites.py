"""The site directory: organisations folded from reference records, and the labelling rule."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import permutations
from typing import Any

import polars as pl

from core.contracts.facts import (
    DeviceDescription,
    DeviceRecord,
    OrganizationRecord,
    Provenance,
    ReferenceRecord,
)
from feasibility.sites import (
    UNRESOLVED,
    SiteDirectory,
    SiteView,
    describe_sites,
    label_population,
    label_site,
)

SOURCE = "urn:test:ehr"
KEY = f"{SOURCE}|Organization|org1"
OTHER = "urn:test:other|Organization|x9"


def record(
    key: str = KEY,
    seq: int = 1,
    ods: str | None = "RA1",
    name: str | None = "Royal A",
    retracted: bool = False,
) -> ReferenceRecord:
    rtype, rid = key.split("|")[1:]
    return ReferenceRecord(
        key=key,
        seq=seq,
        retracted=retracted,
        provenance=Provenance(
            source=key.split("|")[0],
            resource_type=rtype,
            resource_id=rid,
            version=str(seq),
            ingested_at=datetime(2026, 1, 1, tzinfo=UTC),
        ),
        record=None if retracted else OrganizationRecord(ods_code=ods, name=name, region="London"),
    )


def test_the_highest_seq_wins_and_replays_change_nothing() -> None:
    sites = SiteDirectory()
    assert sites.apply(record(seq=2, ods="RA2", name="Renamed"))
    assert not sites.apply(record(seq=1))  # an older version, late
    assert not sites.apply(record(seq=2, ods="RA2", name="Renamed"))  # a replay
    resolved = sites.resolve(KEY)
    assert resolved is not None and (resolved.ods_code, resolved.name) == ("RA2", "Renamed")


def test_a_retracted_organization_is_unresolved_and_stays_so_under_replay() -> None:
    sites = SiteDirectory()
    sites.apply(record(seq=1))
    sites.apply(record(seq=2, retracted=True))
    sites.apply(record(seq=1))
    assert sites.resolve(KEY) is None
    assert label_site(KEY, None, sites) == UNRESOLVED
    assert len(sites) == 0


def test_only_organizations_are_sites() -> None:
    sites = SiteDirectory()
    device = ReferenceRecord(
        key=f"{SOURCE}|Device|d1",
        seq=1,
        provenance=record().provenance,
        record=DeviceRecord(description=DeviceDescription(device=f"{SOURCE}|Device|d1")),
    )
    assert not sites.apply(device)
    assert len(sites) == 0


def test_the_labelling_rule() -> None:
    sites = SiteDirectory()
    sites.apply(record(ods="RA1"))
    sites.apply(record(key=OTHER, ods=None, name="No ODS code"))
    assert label_site(KEY, None, sites) == "RA1"  # resolved now
    assert label_site(KEY, "OLD", sites) == "RA1"  # the organisation as it is now wins
    assert label_site(OTHER, "RB9", sites) == "RB9"  # known without an ODS code: the fact's
    assert label_site(OTHER, None, sites) == UNRESOLVED
    assert label_site(f"{SOURCE}|Organization|late", None, sites) == UNRESOLVED
    assert label_site(None, "RC3", sites) == "RC3"  # an ODS identifier on the reference
    assert label_site(None, None, sites) is None  # no managing organisation: no site
    assert label_site(KEY, None, None) == UNRESOLVED  # no directory: never the key


def test_labels_of_a_population_never_hold_a_key() -> None:
    sites = SiteDirectory()
    sites.apply(record())
    frame = pl.DataFrame(
        {
            "site": [None, None, "RZ1", None, None],
            "site_key": [KEY, OTHER, None, None, KEY],
            "region": ["London", "Wales", "Wales", None, "Wales"],
        }
    )
    labels, regions = label_population(frame, sites)
    assert labels == {
        (KEY, None): "RA1",
        (OTHER, None): UNRESOLVED,
        (None, "RZ1"): "RZ1",
        (None, None): None,
    }
    assert SOURCE not in str(regions)
    # RA1: one patient in London, one in Wales: the first by name on a tie; unresolved: Unknown
    assert regions == {"RA1": "London", UNRESOLVED: "Unknown", "RZ1": "Wales"}
    # a step frame without site_key: ODS codes only
    assert label_population(frame.drop("site_key"), sites)[0] == {(None, None): None,
                                                                  (None, "RZ1"): "RZ1"}  # fmt: skip


def test_the_majority_region_names_a_site() -> None:
    frame = pl.DataFrame({"site": ["RA1"] * 3, "site_key": [None] * 3,
                          "region": ["Wales", "London", "Wales"]})  # fmt: skip
    assert label_population(frame, None)[1] == {"RA1": "Wales"}


def test_a_name_does_not_depend_on_the_order_records_arrive_in() -> None:
    one = record(key=f"{SOURCE}|Organization|a", ods="RA1", name="Alpha")
    two = record(key="urn:test:other|Organization|b", ods="RA1", name="Beta")
    names = set()
    for order in permutations([one, two]):
        sites = SiteDirectory()
        for r in order:
            sites.apply(r)
        names.add(sites.name_of("RA1"))
    assert len(names) == 1


def test_describe() -> None:
    sites = SiteDirectory()
    sites.apply(record())
    assert describe_sites(["RA1", UNRESOLVED], sites) == {
        "RA1": {"ods_code": "RA1", "name": "Royal A", "resolved": True},
        UNRESOLVED: {
            "ods_code": None,
            "name": None,
            "resolved": False,
            "note": sites.describe([UNRESOLVED])[UNRESOLVED]["note"],
        },
    }
    assert describe_sites(["RB2"], None) == {
        "RB2": {"ods_code": "RB2", "name": None, "resolved": True}
    }


class Message:
    def __init__(self, key: str, value: bytes | None) -> None:
        self._key, self._value = key.encode(), value

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes | None:
        return self._value


def test_the_view_folds_reference_topic_messages_and_tombstones() -> None:
    view = SiteView("127.0.0.1:1", "unused.reference")  # never started: fed by hand
    messages: list[Any] = [
        Message(f"{SOURCE}|Practitioner|p1", b"not even json: never decoded"),
        Message(KEY, record().to_json()),
    ]
    view._absorb(messages)
    assert label_site(KEY, None, view) == "RA1"
    tombstone: list[Any] = [Message(KEY, None)]  # compaction's
    view._absorb(tombstone)
    assert view.resolve(KEY) is None
