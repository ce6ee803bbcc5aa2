"""Sites as sponsors see them: ODS code and name, resolved when an answer is given.

A patient fact keeps the managing organisation's reference key (``source|Organization|id``),
which does not depend on arrival order, and the ODS code only if the adapter knew it then
(:class:`core.contracts.facts.PatientFact`). Which site a patient is at is decided here, at
answer time, from the organisations on the compacted reference topic: an Organization that
arrives after its patients names them in every answer from then on, and an ODS code corrected
at the source moves them at once.

:class:`SiteDirectory` is the fold (organisations by key, the highest ``seq`` wins, a retraction
forgets the organisation); :class:`SiteView` keeps one current from the reference topic through
:class:`infra.mirror.TopicMirror`. :func:`label_site` is the one rule that turns a patient's
``(key, ODS code)`` into the label an answer shows:

1. the ODS code of the organisation the key names, when the directory holds it with one;
2. else the ODS code the fact carried;
3. else :data:`UNRESOLVED` (the patient has a managing organisation nobody has described yet,
   or one without an ODS code), never the key itself: keys embed source-system URIs;
4. no managing organisation at all: no site (``None``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl

from core.contracts.facts import OrganizationRecord, ReferenceRecord, decode_reference

if TYPE_CHECKING:
    from confluent_kafka import Message

    from infra.mirror import ReaderStatus

log = logging.getLogger(__name__)

#: The label of patients whose managing organisation has no known ODS code.
UNRESOLVED = "unresolved site"
#: The region an unresolved site is counted in (its organisation, and so its region, is unknown).
UNRESOLVED_REGION = "Unknown"

_ORGANIZATION = "|Organization|"


@dataclass(frozen=True)
class Site:
    """A managing organisation as an answer names it."""

    ods_code: str | None
    name: str | None
    region: str


class SiteResolver(Protocol):
    def resolve(self, key: str) -> Site | None: ...

    def name_of(self, ods_code: str) -> str | None: ...


def label_site(key: str | None, ods_code: str | None, sites: SiteResolver | None) -> str | None:
    """The site label of a patient whose fact holds organisation ``key`` and ``ods_code``."""
    if key is not None and sites is not None:
        site = sites.resolve(key)
        if site is not None and site.ods_code:
            return site.ods_code
    if ods_code:
        return ods_code
    return UNRESOLVED if key is not None else None


#: A patient's ``(organisation key, ODS code)`` as the facts hold them.
Pair = tuple[str | None, str | None]


def with_site_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with both site columns (``site``, the ODS code, and ``site_key``), a missing
    one as nulls (an engine's step frame may carry only ``site``)."""
    absent = [c for c in ("site", "site_key") if c not in frame.columns]
    return frame.with_columns([pl.lit(None, dtype=pl.String).alias(c) for c in absent])


def label_population(
    population: pl.DataFrame, sites: SiteResolver | None
) -> tuple[dict[Pair, str | None], dict[str, str]]:
    """The label of every site pair in ``population`` (columns ``site``, ``site_key``,
    ``region``), and each label's region: the region most of its patients are in, ties to the
    first by name; :data:`UNRESOLVED_REGION` for :data:`UNRESOLVED`, whose organisation is not
    known. One pass over the patients; the labelling itself is per distinct pair."""
    groups = with_site_columns(population).group_by("site_key", "site", "region").len()
    labels: dict[Pair, str | None] = {}
    tallies: dict[str, dict[str, int]] = {}
    for key, code, region, n in groups.iter_rows():
        pair = (key, code)
        if pair not in labels:
            labels[pair] = label_site(key, code, sites)
        label = labels[pair]
        if label is not None:
            tally = tallies.setdefault(label, {})
            place = region or "Unknown"
            tally[place] = tally.get(place, 0) + n
    regions = {
        label: UNRESOLVED_REGION
        if label == UNRESOLVED
        else min(tally.items(), key=lambda item: (-item[1], item[0]))[0]
        for label, tally in tallies.items()
    }
    return labels, regions


class SiteDirectory:
    """Organisations by reference key, folded from ``ReferenceRecord``\\ s (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: key -> (seq, record or None when retracted)
        self._held: dict[str, tuple[int, OrganizationRecord | None]] = {}
        self.records = 0

    def apply(self, record: ReferenceRecord) -> bool:
        """Fold one record in; True when it changed what the directory holds."""
        if _ORGANIZATION not in record.key:
            return False
        body = record.record if not record.retracted else None
        if body is not None and not isinstance(body, OrganizationRecord):
            return False
        with self._lock:
            self.records += 1
            held = self._held.get(record.key)
            if held is not None and held[0] >= record.seq:
                return False
            self._held[record.key] = (record.seq, body)
            return True

    def forget(self, key: str) -> None:
        """A tombstone on the compacted topic: nothing is known of ``key`` any more."""
        with self._lock:
            self._held.pop(key, None)

    def resolve(self, key: str) -> Site | None:
        with self._lock:
            held = self._held.get(key)
        if held is None or held[1] is None:
            return None
        org = held[1]
        return Site(org.ods_code or None, org.name, org.region)

    def name_of(self, ods_code: str) -> str | None:
        """The name of the organisation with this ODS code (of the smallest key holding one,
        so the answer is the same whatever order the records came in)."""
        with self._lock:
            found = sorted(
                (key, held[1].name)
                for key, held in self._held.items()
                if held[1] is not None and held[1].ods_code == ods_code and held[1].name
            )
        return found[0][1] if found else None

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for _, org in self._held.values() if org is not None)

    def describe(self, labels: Iterable[str]) -> dict[str, dict[str, Any]]:
        """What an answer says of each site label it shows: ODS code and name."""
        out: dict[str, dict[str, Any]] = {}
        for label in sorted(set(labels)):
            if label == UNRESOLVED:
                out[label] = {
                    "ods_code": None,
                    "name": None,
                    "resolved": False,
                    "note": "patients whose managing organisation is not (yet) known with an "
                    "ODS code; they move to their site once its Organization is ingested",
                }
            else:
                out[label] = {"ods_code": label, "name": self.name_of(label), "resolved": True}
        return out


def describe_sites(labels: Iterable[str], sites: SiteDirectory | None) -> dict[str, dict[str, Any]]:
    """:meth:`SiteDirectory.describe`, or ODS codes without names when there is no directory."""
    return (sites or SiteDirectory()).describe(labels)


class SiteView(SiteDirectory):
    """A :class:`SiteDirectory` kept current from the reference topic by a
    :class:`~infra.mirror.TopicMirror` (which survives broker restarts and reports lag)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        stale_after: float = 5.0,
        max_staleness: float = 5.0,
    ) -> None:
        from infra.mirror import TopicMirror

        super().__init__()
        self.topic = topic
        self.mirror = TopicMirror(
            "site-view",
            bootstrap,
            topic,
            self._absorb,
            stale_after=stale_after,
            max_staleness=max_staleness,
        )

    def start(self) -> SiteView:
        self.mirror.start()
        return self

    def stop(self) -> None:
        self.mirror.stop()

    def readiness(self) -> ReaderStatus:
        return self.mirror.status()

    def wait_ready(self, timeout: float) -> bool:
        return self.mirror.wait_ready(timeout)

    def _absorb(self, messages: list[Message]) -> None:
        for message in messages:
            raw_key = message.key()
            key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else ""
            if _ORGANIZATION not in key:
                continue  # practitioners, roles, devices: not sites
            value = message.value()
            if value is None:
                self.forget(key)
                continue
            self.apply(decode_reference(value))


__all__ = [
    "UNRESOLVED",
    "Site",
    "SiteDirectory",
    "SiteView",
    "describe_sites",
    "label_population",
    "label_site",
    "with_site_columns",
]
