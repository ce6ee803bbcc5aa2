"""The ingest pipeline: validate, normalise, pseudonymise, order versions, publish, dead-letter.

One :class:`Ingestor` serves every input (files, Bundles, NDJSON, the REST endpoint, Subscription
notifications). Every resource it is given ends in exactly one of four outcomes, counted in
:class:`IngestStats`:

* ``accepted``: a new resource version was published (facts or reference record);
* ``unchanged``: the same version (or identical content, or an older version) was seen before;
* ``skipped``: a valid resource type the product does not use (Claim, Encounter, ...);
* ``dead_lettered``: invalid; an OperationOutcome and the original payload went to the
  dead-letter topic.

Work is done in batches: the resource index is read once per batch, messages are published, the
producer is flushed (every message acknowledged) and only then is the index committed. After a
crash in between, the next ingestor on the vault publishes the first version of each key well
above the index (``RESTART_GAP``), so whatever the dead one published and never indexed can share
a ``seq`` with nothing new; a version published again is then a higher copy of itself, which
changes no state.

A failed flush (or any error before the index is committed) *aborts* the batch
(:meth:`Ingestor.abort`): what the sink still holds is purged, the vault's uncommitted writes are
rolled back, and nothing of the batch reaches the index, so a retry publishes again. A purged
message may still have been written by the broker; so that two different envelopes never share a
(key, seq), the highest seq of each aborted key is kept as a *seq floor* (in the vault, beside the
index) and the next publication of that key goes above it, whatever its content.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Literal
from urllib.parse import unquote

import orjson

from core.contracts.facts import (
    DeviceDescription,
    DeviceRecord,
    OrganizationRecord,
    Provenance,
    ReferenceRecord,
    ResourceFacts,
    resource_key,
)

from .extract import (
    EXTRACTORS,
    PATIENT_SCOPED,
    SUPPORTED,
    Extracted,
    FhirVersion,
    UnknownReference,
    check_resource_header,
    extract_device,
    extract_patient,
)
from .outcome import Issue, model_class, operation_outcome, validate_with_models
from .primitives import InvalidElement, id_problem, is_id, parse_instant
from .pseudonym import Pseudonymiser
from .sinks import DEADLETTER_MAX_BYTES, DeadLetter, FactSink
from .vault import IndexEntry, Vault

log = logging.getLogger(__name__)

Status = Literal["accepted", "unchanged", "skipped", "dead_lettered"]
STATUSES: tuple[Status, ...] = ("accepted", "unchanged", "skipped", "dead_lettered")

#: Order in which a Bundle's entries are processed, so references resolve.
_TYPE_ORDER = {
    "Organization": 0,
    "Practitioner": 1,
    "PractitionerRole": 2,
    "Patient": 3,
    "Device": 4,
}


#: A dead letter of something too large keeps this many of its first bytes, with its size and
#: SHA-256 (never the whole payload).
EXCERPT_BYTES = 4096


#: The largest batch an ingestor commits at once (resources between two index commits).
MAX_BATCH = 5000
#: How far above the index the first version of a key goes when another ingestor ran on the
#: vault before this one (see ``Ingestor._next_seq``): above two seqs per resource of its last,
#: possibly uncommitted, batch.
RESTART_GAP = 2 * MAX_BATCH + 1
#: Keys an ingestor remembers having published (beyond these, the gap applies again).
OWN_KEYS = 500_000


@dataclass(frozen=True)
class Excerpt:
    """A payload too large to keep whole: its first bytes, its size and its SHA-256 (``None``
    where the payload was refused before it was read whole)."""

    head: bytes
    size: int | None
    sha256: str | None

    @classmethod
    def of(cls, raw: bytes) -> Excerpt:
        return cls(raw[:EXCERPT_BYTES], len(raw), hashlib.sha256(raw).hexdigest())

    def text(self) -> str:
        text = self.head[:EXCERPT_BYTES].decode("utf-8", errors="replace")
        while len(text.encode()) > EXCERPT_BYTES:  # a replacement character is 3 bytes
            text = text[:-1]
        return text


@dataclass
class Outcome:
    status: Status
    resource_type: str
    resource_id: str | None = None
    key: str | None = None
    seq: int | None = None
    reason: str | None = None
    outcome: dict[str, Any] | None = None
    #: An accepted resource the index did not know before (HTTP 201 rather than 200).
    created: bool = False


@dataclass
class IngestStats:
    counts: Counter[str] = field(default_factory=Counter)
    by_type: dict[str, Counter[str]] = field(default_factory=dict)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self.by_type.setdefault(outcome.resource_type, Counter())[outcome.status] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            **{status: self.counts.get(status, 0) for status in STATUSES},
            "total": self.total,
            "by_resource_type": {
                rtype: {status: counts.get(status, 0) for status in STATUSES}
                for rtype, counts in sorted(self.by_type.items())
            },
            "subscription_gaps": self.gaps,
            "seconds": round(time.perf_counter() - self.started, 3),
        }


class _Context:
    """Reference resolution for one resource (bundle-aware)."""

    def __init__(
        self,
        ingestor: Ingestor,
        version: FhirVersion,
        bundle_refs: Mapping[str, tuple[str, str]] | None,
    ) -> None:
        self.ingestor = ingestor
        self.fhir_version = version
        self.bundle_refs = bundle_refs or {}

    def key_for(self, reference: str, expected_type: str | None = None) -> str | None:
        source = self.ingestor.source
        target = self.bundle_refs.get(reference)
        if target is not None:
            return resource_key(source, *target)
        if reference.startswith("#") or "?" in reference or reference.startswith("urn:"):
            return None
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        if len(parts) < 2:
            return None
        rtype, rid = parts[-2], parts[-1]
        if expected_type and rtype != expected_type:
            return None
        return resource_key(source, rtype, rid)

    def patient_for(self, reference: str | None, identifier: str | None, expression: str) -> str:
        ingestor = self.ingestor
        if reference and "?" in reference:
            rtype, _, query = reference.partition("?")
            if rtype != "Patient" or not query.startswith("identifier="):
                raise InvalidElement(expression, f"unsupported conditional reference {reference!r}")
            identifier = unquote(query[len("identifier=") :])  # a search URL: %7C is "|"
            reference = None
        if reference:
            key = self.key_for(reference)
            if key is None or "|Patient|" not in key:
                raise UnknownReference(
                    expression,
                    f"reference {reference!r} does not resolve to a Patient"
                    + (" in this Bundle" if reference.startswith("urn:") else ""),
                )
            pseudonym = ingestor.patient_by_key(key)
            if pseudonym is None:
                raise UnknownReference(
                    expression,
                    f"unknown patient {reference!r}: ingest the "
                    "Patient first (or in the same Bundle)",
                )
            return pseudonym
        if identifier:
            pseudonym = ingestor.vault.patient_by_identifier(
                ingestor.pseudonymiser.token(identifier)
            )
            if pseudonym is None:
                raise UnknownReference(expression, "no patient known with that identifier")
            return pseudonym
        raise InvalidElement(expression, "reference has neither reference nor identifier")

    def organization(self, key: str) -> OrganizationRecord | None:
        return self.ingestor.vault.get_organization(key)

    def device(self, key: str) -> DeviceDescription | None:
        return self.ingestor.vault.get_device(key)


def content_hash(resource: Mapping[str, Any]) -> str:
    body = {k: v for k, v in resource.items() if k != "meta"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _version_of(resource: Mapping[str, Any]) -> tuple[str | None, str | None]:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return None, None
    version = meta.get("versionId")
    updated = meta.get("lastUpdated")
    return (
        str(version) if version is not None else None,
        str(updated) if updated is not None else None,
    )


def _is_older(
    version: str | None, updated: str | None, entry: IndexEntry, strict: bool = False
) -> bool:
    """Is the incoming version older than (or, unless ``strict``, the same as) the one indexed?"""
    if updated and entry.last_updated:
        new = parse_instant(updated, "meta.lastUpdated")
        old = parse_instant(entry.last_updated, "meta.lastUpdated")
        if new != old:
            return new < old
    if version is not None and entry.version_id is not None:
        if version.isdigit() and entry.version_id.isdigit():
            if strict:
                return int(version) < int(entry.version_id)
            return int(version) <= int(entry.version_id)
        return version == entry.version_id and not strict
    return False


def _loggable_type(resource_type: str) -> str:
    """A resource type as a log may show it: a type FHIR defines, else not the input's text."""
    if resource_type == "(unparsed)":
        return resource_type
    known = model_class(resource_type, "R4") or model_class(resource_type, "R5")
    return resource_type if known is not None else "(type FHIR does not define)"


class Ingestor:
    def __init__(
        self,
        vault: Vault,
        sink: FactSink,
        pseudonymiser: Pseudonymiser,
        source: str,
        validation_mode: Literal["fast", "full"] = "fast",
        max_resource_bytes: int = 1_000_000,
        batch_size: int = 2000,
    ) -> None:
        self.vault = vault
        self.sink = sink
        self.pseudonymiser = pseudonymiser
        self.source = source
        self.validation_mode = validation_mode
        self.max_resource_bytes = max_resource_bytes
        self.batch_size = batch_size
        self.stats = IngestStats()
        self._pending: dict[str, IndexEntry] = {}
        #: Index entries read ahead for the current batch; None marks a key known to be absent.
        self._prefetched: dict[str, IndexEntry | None] = {}
        #: >0 while a read-ahead batch (NDJSON chunk, Bundle) is being processed.
        self._batch_depth = 0
        self._patients: OrderedDict[str, str] = OrderedDict()
        self._since_commit = 0
        #: Seq floors read ahead (0: none), and those of batches aborted by this process (kept
        #: in memory too, in case the vault could not record them).
        self._floors: dict[str, int] = {}
        self._burned: dict[str, int] = {}
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}")
        #: Ingestors started on this vault before this one (see :meth:`_next_seq`).
        self.epoch = vault.start_epoch()
        #: Keys this ingestor published (most recent last, bounded): every seq of theirs that
        #: may be on the broker is in the index, the floors or ``_burned``.
        self._own: OrderedDict[str, None] = OrderedDict()

    @contextmanager
    def acting_as(self, source: str | None) -> Iterator[Ingestor]:
        """Ingest as the source system ``source`` (None: this ingestor's own) until the block
        ends: every key, provenance and dead letter names it, so a source reaches only its own
        resources (the API passes the source system of the caller's token). Not for
        concurrent use: the API runs one request at a time (``rest.IngestService``)."""
        if source is None or source == self.source:
            yield self
            return
        if "|" in source:
            raise ValueError("a source system may not contain '|' (it is part of resource keys)")
        own = self.source
        self.source = source
        try:
            yield self
        finally:
            self.source = own

    # --- lookups ---------------------------------------------------------------------------

    def _entry(self, key: str) -> IndexEntry | None:
        entry = self._pending.get(key)
        if entry is not None:
            return entry
        if key in self._prefetched:
            return self._prefetched[key]
        entry = self.vault.get_index([key]).get(key)
        self._prefetched[key] = entry
        return entry

    def _floor(self, key: str) -> int:
        """The highest seq of this key that may be on the broker without being in the index."""
        floor = self._floors.get(key)
        if floor is None:
            floor = self._floors[key] = self.vault.get_seq_floors([key]).get(key, 0)
        return max(floor, self._burned.get(key, 0))

    def _next_seq(self, key: str, indexed: int, floor: int) -> int:
        """The seq of the next version of ``key`` this ingestor publishes.

        Normally one above the index and the floors. But an ingestor that ran on this vault
        before may have been killed between the broker's acknowledgement of its last batch and
        the commit of that batch to the index: versions of its keys may then be on the broker
        with seqs above the index, that no floor records. Publishing another version at one of
        those seqs would give two different envelopes the same (key, seq), and consumers keep
        the first: the new version would be silently lost. So the first version of a key that
        this ingestor publishes, when another ran before it, goes above every seq the dead one
        could have used: at most two per resource of a batch (a retraction from the old
        patient, then the new version) above the index, and a batch is at most
        :data:`MAX_BATCH` resources. A key dropped from the bounded memory of what this
        ingestor published only gets the gap again, which is harmless (seqs are ordered, not
        counted)."""
        seq = max(indexed, floor) + 1
        if self.epoch and key not in self._own:
            seq = max(indexed, floor) + RESTART_GAP
        self._own[key] = None
        self._own.move_to_end(key)
        if len(self._own) > OWN_KEYS:
            self._own.popitem(last=False)
        return seq

    def patient_by_key(self, key: str) -> str | None:
        cached = self._patients.get(key)
        if cached is not None:
            return cached
        entry = self._entry(key)
        if entry is None or entry.patient is None or entry.retracted:
            return None
        self._remember_patient(key, entry.patient)
        return entry.patient

    def _remember_patient(self, key: str, pseudonym: str) -> None:
        self._patients[key] = pseudonym
        if len(self._patients) > 200_000:
            self._patients.popitem(last=False)

    def prefetch(self, keys: Iterable[str]) -> None:
        """Read the index entries of a batch's keys in one query (absent keys remembered too)."""
        missing = [k for k in keys if k not in self._pending and k not in self._prefetched]
        if missing:
            found = self.vault.get_index(missing)
            floors = self.vault.get_seq_floors(missing)
            for key in missing:
                self._prefetched[key] = found.get(key)
                self._floors[key] = floors.get(key, 0)

    # --- batching --------------------------------------------------------------------------

    def commit(self) -> None:
        """Make everything published so far durable: flush the producer, then the index.

        If either fails the batch is aborted (:meth:`abort`) and the error raised: nothing of
        it is in the index, so publishing it again is the retry."""
        try:
            self.sink.flush()
            self.vault.put_index(self._pending.values())
            self.vault.commit()
        except BaseException:
            self.abort()
            raise
        # Forget what was read ahead: another process (the CLI beside the API) may write the
        # same vault, and a key remembered as absent must be looked up again next batch.
        if self._batch_depth:
            # Mid-batch: what was read ahead (and just written) stays valid for the rest of it.
            self._prefetched.update(self._pending)
        else:
            self._prefetched.clear()
            self._floors.clear()
        self._pending.clear()
        self._since_commit = 0

    def abort(self) -> None:
        """Forget everything since the last commit: purge what the sink has not delivered, roll
        the vault back, leave the index as it was, and record each pending key's seq as its
        floor (a purged message may have reached the broker: its seq is not used again)."""
        floors = {key: entry.seq for key, entry in self._pending.items()}
        for key, seq in floors.items():
            self._burned[key] = max(seq, self._burned.get(key, 0))
        self._pending.clear()
        self._prefetched.clear()
        self._floors.clear()
        self._patients.clear()
        self._since_commit = 0
        try:
            discard = getattr(self.sink, "discard", None)
            if discard is not None:
                discard()
        finally:
            self.vault.rollback()
            if floors:
                try:
                    self.vault.put_seq_floors(floors)
                    self.vault.commit()
                except Exception:  # the floors stay in memory (self._burned)
                    log.exception("could not record %d seq floors in the vault", len(floors))
                    self.vault.rollback()
        log.warning("batch aborted: %d resource versions not indexed", len(floors))

    def _count(self, outcome: Outcome) -> Outcome:
        self.stats.add(outcome)
        self._since_commit += 1
        if self._since_commit >= self.batch_size:
            self.commit()
        return outcome

    # --- dead letters ----------------------------------------------------------------------

    def dead_letter(
        self,
        payload: bytes | str | Mapping[str, Any] | Excerpt,
        issues: list[Issue],
        origin: str,
        resource_type: str = "(unparsed)",
        resource_id: str | None = None,
    ) -> Outcome:
        """Send ``payload`` to the dead-letter topic with the reasons. The letter holds the whole
        payload unless it is an :class:`Excerpt` or the letter would be too large for the topic:
        then the first :data:`EXCERPT_BYTES` bytes, with the payload's size and SHA-256."""
        excerpt = payload if isinstance(payload, Excerpt) else None
        data = b""
        if isinstance(payload, Mapping):
            data = orjson.dumps(payload)
        elif isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            # A str may hold lone surrogates (not UTF-8, so not JSON): keep what can be kept.
            data = payload.encode("utf-8", errors="replace")
        outcome = operation_outcome(issues)
        letter: dict[str, Any] = {
            "schema": "concierge.deadletter/1",
            "received_at": datetime.now(UTC).isoformat(),
            "source": self.source,
            "origin": origin,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "operation_outcome": outcome,
        }
        value = b""
        if excerpt is None:
            letter["payload"] = data.decode("utf-8", errors="replace")
            letter["payload_truncated"] = False
            letter["payload_bytes"] = len(data)
            letter["payload_sha256"] = hashlib.sha256(data).hexdigest()
            value = orjson.dumps(letter)
            if len(value) > DEADLETTER_MAX_BYTES:
                excerpt = Excerpt.of(data)
        if excerpt is not None:
            letter["payload"] = excerpt.text()
            letter["payload_truncated"] = True
            letter["payload_bytes"] = excerpt.size
            letter["payload_sha256"] = excerpt.sha256
            value = orjson.dumps(letter)
        self.sink.dead_letter(DeadLetter(key=origin, value=value))
        # The origin (a URL naming the resource, a file name) and the diagnostics (a parser's
        # message may quote a value, a birth date) stay in the letter: the log gets the type
        # and the issue codes only (logs carry pseudonyms and counts, never input).
        log.info(
            "dead-lettered a %s resource (issues: %s); its OperationOutcome is on the "
            "dead-letter topic",
            _loggable_type(resource_type),
            ",".join(sorted({issue.code for issue in issues})) or "none",
        )
        return self._count(
            Outcome(
                "dead_lettered",
                resource_type,
                resource_id,
                reason=issues[0].diagnostics if issues else None,
                outcome=outcome,
            )
        )

    # --- entry points ----------------------------------------------------------------------

    def ingest_text(
        self, text: bytes | str, origin: str, fhir_version: FhirVersion | None = None
    ) -> list[Outcome]:
        """A JSON document: one resource or a Bundle."""
        try:
            document = loads(text)
        except orjson.JSONDecodeError as exc:
            return [self.dead_letter(text, [Issue("structure", f"invalid JSON: {exc}")], origin)]
        return self.ingest_document(document, text, origin, fhir_version)

    def ingest_document(
        self,
        document: Any,
        text: bytes | str,
        origin: str,
        fhir_version: FhirVersion | None = None,
    ) -> list[Outcome]:
        """A parsed JSON document (``text`` is what it was parsed from)."""
        size = len(text)
        if not isinstance(document, dict):
            return [
                self.dead_letter(
                    text, [Issue("structure", "a FHIR resource must be a JSON object")], origin
                )
            ]
        if document.get("resourceType") == "Bundle":
            return self.ingest_bundle(document, origin, fhir_version)
        if size > self.max_resource_bytes:
            raw = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
            return [self._oversize(document, size, origin, raw)]
        return [self.ingest_resource(document, origin, fhir_version)]

    def _oversize(
        self, resource: Mapping[str, Any], size: int, origin: str, raw: bytes | None = None
    ) -> Outcome:
        return self.dead_letter(
            Excerpt.of(raw if raw is not None else orjson.dumps(resource)),
            [
                Issue(
                    "too-long",
                    f"resource is {size} bytes; the limit is "
                    f"{self.max_resource_bytes} (CONCIERGE_MAX_RESOURCE_BYTES); the dead letter "
                    f"holds its first {EXCERPT_BYTES} bytes",
                )
            ],
            origin,
            str(resource.get("resourceType", "(unknown)")),
            str(resource.get("id")) if resource.get("id") else None,
        )

    def ingest_resource(
        self,
        resource: Mapping[str, Any],
        origin: str,
        fhir_version: FhirVersion | None = None,
        bundle_refs: Mapping[str, tuple[str, str]] | None = None,
        entry_request: Mapping[str, Any] | None = None,
    ) -> Outcome:
        rtype = resource.get("resourceType")
        rid = resource.get("id") if isinstance(resource.get("id"), str) else None
        if not isinstance(rtype, str):
            return self.dead_letter(
                resource,
                [Issue("required", "resourceType is missing or not a string", "resourceType")],
                origin,
            )
        version: FhirVersion = fhir_version or ("R5" if rtype in ("DeviceUsage",) else "R4")
        if model_class(rtype, version) is None:
            return self.dead_letter(
                resource,
                [
                    Issue(
                        "not-supported",
                        f"unknown resource type {rtype!r} in FHIR {version}",
                        "resourceType",
                    )
                ],
                origin,
                rtype,
                rid,
            )
        if rtype not in SUPPORTED:
            return self._count(
                Outcome("skipped", rtype, rid, reason=f"{rtype} is not used by the product")
            )
        if rid is None:
            return self.dead_letter(
                resource,
                [Issue("required", "resource id is required to track versions", f"{rtype}.id")],
                origin,
                rtype,
            )
        if self.validation_mode == "full":
            issues = validate_with_models(dict(resource), version)
            if issues:
                return self.dead_letter(resource, issues, origin, rtype, rid)
        ctx = _Context(self, version, bundle_refs)
        key = resource_key(self.source, rtype, rid)
        try:
            check_resource_header(resource, rtype)
            extracted = self._extract(resource, rtype, key, ctx)
        except InvalidElement as exc:
            return self._reject(resource, exc, version, origin, rtype, rid)
        return self._publish(resource, extracted, key, rid, version, origin)

    def _reject(
        self,
        resource: Mapping[str, Any],
        exc: InvalidElement,
        version: FhirVersion,
        origin: str,
        rtype: str,
        rid: str | None,
    ) -> Outcome:
        ours = Issue(
            "not-found" if isinstance(exc, UnknownReference) else "invalid",
            exc.message,
            exc.expression,
        )
        # Explain with the full models too, so the reason is as precise as they would give.
        theirs = (
            []
            if isinstance(exc, UnknownReference) or self.validation_mode == "full"
            else validate_with_models(dict(resource), version)
        )
        return self.dead_letter(resource, [*theirs, ours], origin, rtype, rid)

    def _extract(
        self, resource: Mapping[str, Any], rtype: str, key: str, ctx: _Context
    ) -> Extracted:
        if rtype == "Patient":
            entry = self._entry(key)
            if entry is not None and entry.patient:
                pseudonym = entry.patient
            else:
                identifiers = _identifier_tokens(resource)
                pseudonym = self.pseudonymiser.for_patient(
                    identifiers, self.source, str(resource["id"])
                )
            return extract_patient(resource, ctx, pseudonym)
        if rtype == "Device":
            return extract_device(resource, ctx, key)
        return EXTRACTORS[rtype](resource, ctx)

    def _publish(
        self,
        resource: Mapping[str, Any],
        extracted: Extracted,
        key: str,
        rid: str,
        version: FhirVersion,
        origin: str,
    ) -> Outcome:
        rtype = extracted.resource_type
        version_id, last_updated = _version_of(resource)
        digest = content_hash(resource)
        entry = self._entry(key)
        floor = self._floor(key)
        # A seq above the index may be on the broker from an aborted batch, with this content
        # or other: publish again (above it) rather than call anything unchanged.
        unresolved = floor > (entry.seq if entry else 0)
        if entry is not None:
            if not unresolved and (
                digest == entry.content_hash
                or (entry.has_seen(digest) and not version_id and not last_updated)
            ):
                return self._count(
                    Outcome(
                        "unchanged",
                        rtype,
                        rid,
                        key,
                        entry.seq,
                        reason="same content already ingested",
                    )
                )
            if _is_older(version_id, last_updated, entry, strict=unresolved):
                return self._count(
                    Outcome(
                        "unchanged",
                        rtype,
                        rid,
                        key,
                        entry.seq,
                        reason="an equal or newer version was already ingested",
                    )
                )
        seq = self._next_seq(key, entry.seq if entry else 0, floor)
        patient = extracted.patient
        # A Patient's own logical id can be an identifier at the source (some systems use the
        # NHS number): downstream, a Patient resource is known by its pseudonym only.
        public_id = patient if rtype == "Patient" and patient else rid
        public_key = resource_key(self.source, rtype, public_id)
        provenance = Provenance(
            source=self.source,
            resource_type=rtype,
            resource_id=public_id,
            version=version_id or f"sha256:{digest[:16]}",
            last_updated=parse_instant(last_updated, "meta.lastUpdated") if last_updated else None,
            ingested_at=datetime.now(UTC),
            fhir_version=version,
        )
        retract = extracted.entered_in_error
        if (
            entry is not None
            and entry.patient
            and patient
            and entry.patient != patient
            and not entry.retracted
        ):
            # The resource moved to another patient: retract it from the old one first.
            self.sink.facts(
                ResourceFacts(
                    key=key, patient=entry.patient, seq=seq, retracted=True, provenance=provenance
                )
            )
            seq += 1
        if extracted.route == "reference" and extracted.record is not None:
            self.sink.reference(
                ReferenceRecord(
                    key=key,
                    seq=seq,
                    retracted=retract,
                    provenance=provenance,
                    record=None if retract else extracted.record,
                )
            )
            if isinstance(extracted.record, OrganizationRecord):
                self.vault.put_organization(key, extracted.record)
            elif isinstance(extracted.record, DeviceRecord):
                self.vault.put_device(key, extracted.record.description)
        if patient is not None and (extracted.route == "facts" or extracted.also_facts):
            self.sink.facts(
                ResourceFacts(
                    key=public_key,
                    patient=patient,
                    seq=seq,
                    retracted=retract,
                    provenance=provenance,
                    facts=() if retract else extracted.facts,
                )
            )
        if extracted.identity is not None and patient is not None:
            hashes = [self.pseudonymiser.token(t) for t in extracted.identity.identifiers]
            self.vault.put_identity(patient, self.source, extracted.identity, hashes)
            self._remember_patient(key, patient)
        self._pending[key] = IndexEntry(
            key,
            patient,
            seq,
            digest,
            last_updated,
            version_id,
            retract,
            entry.seen_with(digest) if entry else digest[:16],
        )
        return self._count(
            Outcome(
                "accepted",
                rtype,
                rid,
                key,
                seq,
                reason="retracted (entered-in-error)" if retract else None,
                created=entry is None,
            )
        )

    def delete(self, rtype: str, rid: str, origin: str) -> Outcome:
        """Retract a resource (FHIR DELETE): every count its last version moved moves back.
        Only this source system's: the key names it."""
        if not is_id(rid):
            return self.dead_letter(
                {"request": {"method": "DELETE", "url": f"{rtype}/{rid}"}},
                [Issue("value", id_problem(rid), f"{rtype}.id")],
                origin,
                rtype,
            )
        key = resource_key(self.source, rtype, rid)
        entry = self._entry(key)
        if entry is None or entry.retracted:
            return self._count(
                Outcome(
                    "unchanged",
                    rtype,
                    rid,
                    key,
                    entry.seq if entry else None,
                    reason="nothing to delete",
                )
            )
        seq = self._next_seq(key, entry.seq, self._floor(key))
        # A deleted Patient no longer resolves (the index says retracted; the cache must agree).
        self._patients.pop(key, None)
        public_id = entry.patient if rtype == "Patient" and entry.patient else rid
        provenance = Provenance(
            source=self.source,
            resource_type=rtype,
            resource_id=public_id,
            version=f"deleted-{seq}",
            ingested_at=datetime.now(UTC),
        )
        if entry.patient and (rtype in PATIENT_SCOPED or rtype == "Device"):
            self.sink.facts(
                ResourceFacts(
                    key=resource_key(self.source, rtype, public_id),
                    patient=entry.patient,
                    seq=seq,
                    retracted=True,
                    provenance=provenance,
                )
            )
        if rtype not in PATIENT_SCOPED:
            self.sink.reference(
                ReferenceRecord(key=key, seq=seq, retracted=True, provenance=provenance)
            )
        self._pending[key] = IndexEntry(
            key, entry.patient, seq, "deleted", None, None, True, entry.seen
        )
        return self._count(Outcome("accepted", rtype, rid, key, seq, reason="deleted"))

    # --- bundles ---------------------------------------------------------------------------

    def ingest_bundle(
        self, bundle: Mapping[str, Any], origin: str, fhir_version: FhirVersion | None = None
    ) -> list[Outcome]:
        from .subscriptions import notification_of

        btype = bundle.get("type")
        entries = bundle.get("entry", [])
        if not isinstance(entries, list) or not isinstance(btype, str):
            return [
                self.dead_letter(
                    bundle,
                    [
                        Issue(
                            "structure",
                            "Bundle.type and Bundle.entry must be a code and an array",
                            "Bundle",
                        )
                    ],
                    origin,
                    "Bundle",
                )
            ]
        if btype == "subscription-notification":
            fhir_version = "R5"
        accepted_types = {
            "collection",
            "transaction",
            "batch",
            "searchset",
            "history",
            "subscription-notification",
            "document",
            "message",
        }
        if btype not in accepted_types:
            return [
                self.dead_letter(
                    bundle,
                    [
                        Issue(
                            "not-supported", f"Bundle type {btype!r} is not an input", "Bundle.type"
                        )
                    ],
                    origin,
                    "Bundle",
                )
            ]
        notification = notification_of(bundle)
        if notification is not None:
            entries = entries[1:]
            gap = notification.check_gap(self.vault)
            if gap is not None:
                self.stats.gaps.append(gap)
                del self.stats.gaps[:-1000]  # a long-running API keeps the latest only
        refs: dict[str, tuple[str, str]] = {}
        work: list[tuple[int, int, dict[str, Any] | None, Mapping[str, Any] | None, str]] = []
        #: By entry index: a batch/transaction response answers in the order of the request.
        outcomes: dict[int, Outcome] = {}
        for index, entry in enumerate(entries):
            where = f"{origin}#entry[{index}]"
            if not isinstance(entry, dict):
                outcomes[index] = self.dead_letter(
                    entry if isinstance(entry, dict) else orjson.dumps(entry),
                    [
                        Issue(
                            "structure",
                            "Bundle entry must be an object",
                            f"Bundle.entry[{index}]",
                        )
                    ],
                    where,
                )
                continue
            resource = entry.get("resource")
            request = entry.get("request") if isinstance(entry.get("request"), dict) else None
            if resource is None:
                work.append((9, index, None, request, where))
                continue
            if not isinstance(resource, dict):
                outcomes[index] = self.dead_letter(
                    orjson.dumps(entry),
                    [
                        Issue(
                            "structure",
                            "Bundle.entry.resource must be an object",
                            f"Bundle.entry[{index}].resource",
                        )
                    ],
                    where,
                )
                continue
            rtype, rid = resource.get("resourceType"), resource.get("id")
            full_url = entry.get("fullUrl")
            if isinstance(rtype, str) and isinstance(full_url, str):
                if rid is None and full_url.startswith("urn:uuid:"):
                    resource = {**resource, "id": full_url[len("urn:uuid:") :]}
                    rid = resource["id"]
                if isinstance(rid, str):
                    refs[full_url] = (rtype, rid)
            if isinstance(rtype, str) and isinstance(rid, str):
                refs.setdefault(f"{rtype}/{rid}", (rtype, rid))
            work.append((_TYPE_ORDER.get(str(rtype), 5), index, resource, request, where))
        work.sort(key=lambda item: (item[0], item[1]))
        self.prefetch(
            resource_key(self.source, str(r.get("resourceType")), str(r.get("id")))
            for _, _, r, _, _ in work
            if r is not None
        )
        big = len(orjson.dumps(bundle)) > self.max_resource_bytes if entries else False
        self._batch_depth += 1
        try:
            for _, index, resource, request, where in work:
                if resource is None:
                    outcomes[index] = self._entry_without_resource(request, where, notification)
                    continue
                if big:
                    size = len(orjson.dumps(resource))
                    if size > self.max_resource_bytes:
                        outcomes[index] = self._oversize(resource, size, where)
                        continue
                outcomes[index] = self.ingest_resource(resource, where, fhir_version, refs, request)
        finally:
            self._batch_depth -= 1
        return [outcomes[index] for index in sorted(outcomes)]

    def _entry_without_resource(
        self, request: Mapping[str, Any] | None, where: str, notification: Any
    ) -> Outcome:
        if request and request.get("method") == "DELETE" and isinstance(request.get("url"), str):
            parts = str(request["url"]).split("?")[0].strip("/").split("/")
            if len(parts) == 2 and model_class(parts[0], "R4") is not None:
                return self.delete(parts[0], parts[1], where)
        if notification is not None:
            return self._count(
                Outcome(
                    "skipped", "(reference only)", reason="id-only notification: nothing to ingest"
                )
            )
        return self.dead_letter(
            {"request": dict(request or {})},
            [Issue("required", "Bundle entry has no resource", "Bundle.entry.resource")],
            where,
        )

    # --- NDJSON ----------------------------------------------------------------------------

    def ingest_ndjson_lines(
        self, lines: Iterable[bytes], origin: str, fhir_version: FhirVersion | None = None
    ) -> Iterator[Outcome]:
        """Bulk Data NDJSON, streamed: one resource per line, never loaded whole.

        Lines are parsed in chunks so the resource index (and the patients referenced) is read
        once per chunk; memory stays bounded by the chunk size whatever the file size.
        """
        numbered = enumerate(lines, start=1)
        while True:
            chunk = list(islice(numbered, self.batch_size))
            if not chunk:
                return
            parsed: list[tuple[str, dict[str, Any] | Outcome]] = []
            keys: list[str] = []
            for number, line in chunk:
                stripped = line.strip()
                if not stripped:
                    continue
                where = f"{origin}:{number}"
                item = self._parse_line(stripped, where)
                parsed.append((where, item))
                if isinstance(item, dict):
                    keys.append(
                        resource_key(
                            self.source, str(item.get("resourceType")), str(item.get("id"))
                        )
                    )
                    subject = item.get("subject") or item.get("patient")
                    reference = subject.get("reference") if isinstance(subject, dict) else None
                    if isinstance(reference, str) and reference.startswith("Patient/"):
                        keys.append(resource_key(self.source, "Patient", reference[8:]))
            if not self._batch_depth:
                self._prefetched.clear()
            self.prefetch(keys)
            self._batch_depth += 1
            try:
                for where, item in parsed:
                    if isinstance(item, Outcome):
                        yield item
                    elif item.get("resourceType") == "Bundle":
                        yield from self.ingest_bundle(item, where, fhir_version)
                    else:
                        yield self.ingest_resource(item, where, fhir_version)
            finally:
                self._batch_depth -= 1

    def _parse_line(self, line: bytes, where: str) -> dict[str, Any] | Outcome:
        if len(line) > self.max_resource_bytes:
            return self.dead_letter(
                Excerpt.of(line),
                [
                    Issue(
                        "too-long",
                        f"line is {len(line)} bytes; the limit is {self.max_resource_bytes} "
                        f"(CONCIERGE_MAX_RESOURCE_BYTES); the dead letter holds its first "
                        f"{EXCERPT_BYTES} bytes",
                    )
                ],
                where,
            )
        try:
            document = loads(line)
        except orjson.JSONDecodeError as exc:
            return self.dead_letter(line, [Issue("structure", f"invalid JSON: {exc}")], where)
        if not isinstance(document, dict):
            return self.dead_letter(
                line, [Issue("structure", "an NDJSON line must be a JSON object")], where
            )
        return document


def loads(text: bytes | str) -> Any:
    """``orjson.loads``, refusing documents nested deeper than orjson can write back (254 levels;
    it reads up to 1024), since every resource is re-serialised for hashing and dead letters."""
    document = orjson.loads(text)
    try:
        orjson.dumps(document)
    except orjson.JSONEncodeError as exc:
        raise orjson.JSONDecodeError(f"nested too deeply ({exc})", "", 0) from None
    return document


def _identifier_tokens(resource: Mapping[str, Any]) -> list[str]:
    from .primitives import read_identifier_token

    tokens = []
    identifiers = resource.get("identifier")
    if isinstance(identifiers, list):
        for index, item in enumerate(identifiers):
            token = read_identifier_token(item, f"Patient.identifier[{index}]")
            if token:
                tokens.append(token)
    return tokens
