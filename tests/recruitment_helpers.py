"""Shared helpers for the recruitment tests: databases on both backends, message builders, a clock.

Database tests run on SQLite and on PostgreSQL. PostgreSQL comes from
``CONCIERGE_TEST_POSTGRES_URL``, e.g. ``export CONCIERGE_TEST_POSTGRES_URL=$(bash
scripts/postgres.sh)``; tests share one migrated schema per session, emptied before each test
(migration tests get an empty schema of their own), dropped at exit. Without the variable the
PostgreSQL cases skip locally and FAIL when ``CI`` is set.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core.contracts.cohorts import CohortRecord
from core.contracts.facts import (
    ConsentFact,
    OrganizationRecord,
    PatientFact,
    PractitionerRecord,
    PractitionerRoleRecord,
    Provenance,
    ReferenceRecord,
    ResourceFacts,
)
from core.contracts.trials import OpaqueTrialRecord
from recruitment.db import upgrade
from recruitment.models import Base

BACKENDS = ("sqlite", "postgresql")
POSTGRES_ENV = "CONCIERGE_TEST_POSTGRES_URL"
SOURCE = "urn:test:ehr"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

_template: dict[str, Path] = {}
_schemas: dict[str, str] = {}


def postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(
            f"{POSTGRES_ENV} is not set: CI must run the PostgreSQL cases "
            "(export CONCIERGE_TEST_POSTGRES_URL=$(bash scripts/postgres.sh))"
        )
    pytest.skip(
        f"PostgreSQL cases need {POSTGRES_ENV}; "
        "run: export CONCIERGE_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)"
    )


def with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


@contextmanager
def fresh_database(backend: str, tmp_path: Path, migrate: bool = True) -> Iterator[str]:
    """A new, empty (or migrated) database on the backend; removed afterwards."""
    if backend == "sqlite":
        target = tmp_path / f"recruitment-{uuid.uuid4().hex[:8]}.sqlite"
        if migrate:
            # Migrating once per session and copying the file keeps the suite fast.
            if "sqlite" not in _template:
                template = tmp_path.parent / f"recruitment-template-{uuid.uuid4().hex[:8]}.sqlite"
                upgrade(f"sqlite:///{template}")
                _template["sqlite"] = template
            shutil.copyfile(_template["sqlite"], target)
        yield f"sqlite:///{target}"
        return
    base = postgres_base_url()
    if migrate:
        # One migrated schema per test session, emptied before each test.
        url = _session_schema(base)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        engine.dispose()
        yield url
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(base, schema)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def _session_schema(base: str) -> str:
    if base not in _schemas:
        schema = f"t_session_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        admin.dispose()
        atexit.register(_drop_schema, base, schema)
        upgrade(with_search_path(base, schema))
        _schemas[base] = with_search_path(base, schema)
    return _schemas[base]


def _drop_schema(base: str, schema: str) -> None:
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    admin.dispose()


@dataclass
class Clock:
    """A settable clock for the service and the dispatcher."""

    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now = self.now + timedelta(**kwargs)
        return self.now


# --------------------------------------------------------------------------- message builders


def practitioner_key(name: str) -> str:
    return f"{SOURCE}|Practitioner|{name}"


def trial(
    trial_id: str = "t1",
    version: int = 1,
    sites: Sequence[str] = ("RA3",),
    target: int | None = None,
    site_targets: dict[str, int] | None = None,
    recruiters: dict[str, str] | None = None,
    status: str = "active",
    title: str | None = "A trial",
) -> OpaqueTrialRecord:
    return OpaqueTrialRecord.model_validate(
        {
            "schema": "concierge.trial/1",
            "id": trial_id,
            "version": version,
            "title": title,
            "sponsor": "Acme",
            "status": status,
            "criteria": {"schema": "concierge.criteria/1"},
            "recruiting_sites": list(sites),
            "target": target,
            "site_targets": site_targets or {},
            "recruiters": recruiters or {},
            "registered_at": T0.isoformat(),
        }
    )


def cohort(
    trial_id: str, patient: str, change: int, member: bool = True, site: str = "RA3"
) -> CohortRecord:
    return CohortRecord.model_validate(
        {
            "schema": "concierge.cohort/1",
            "trial": trial_id,
            "trial_version": 1,
            "patient": patient,
            "site": site,
            "region": "London",
            "member": member,
            "steps": "PP",
            "change": change,
            "at": T0.isoformat(),
        }
    )


def _provenance(resource_type: str, resource_id: str, seq: int) -> Provenance:
    return Provenance(
        source=SOURCE,
        resource_type=resource_type,
        resource_id=resource_id,
        version=str(seq),
        last_updated=T0 + timedelta(minutes=seq),
        ingested_at=T0 + timedelta(minutes=seq),
    )


def patient_facts(
    patient: str,
    gps: Sequence[str] = (),
    site: str = "RA3",
    seq: int = 1,
    deceased: bool = False,
    retracted: bool = False,
) -> ResourceFacts:
    resource_id = f"pat-{patient}"
    return ResourceFacts(
        key=f"{SOURCE}|Patient|{resource_id}",
        patient=patient,
        seq=seq,
        retracted=retracted,
        provenance=_provenance("Patient", resource_id, seq),
        facts=()
        if retracted
        else (
            PatientFact(
                site=site,
                region="London",
                gp_practice=f"{SOURCE}|Organization|practice-1",
                general_practitioners=tuple(gps),
                deceased=deceased,
            ),
        ),
    )


def consent_facts(
    patient: str, opt_out: bool = True, seq: int = 1, status: str = "active", name: str = "c1"
) -> ResourceFacts:
    resource_id = f"consent-{patient}-{name}"
    return ResourceFacts(
        key=f"{SOURCE}|Consent|{resource_id}",
        patient=patient,
        seq=seq,
        provenance=_provenance("Consent", resource_id, seq),
        facts=(ConsentFact(status=status, research_opt_out=opt_out, date=T0),),
    )


def practitioner(
    name: str, seq: int = 1, active: bool = True, email: str | None = None
) -> ReferenceRecord:
    return ReferenceRecord(
        key=practitioner_key(name),
        seq=seq,
        provenance=_provenance("Practitioner", name, seq),
        record=PractitionerRecord(
            name=f"Dr {name}", email=email or f"{name}@nhs.example", active=active
        ),
    )


def organization(org_id: str, ods: str, part_of: str | None = None) -> ReferenceRecord:
    return ReferenceRecord(
        key=f"{SOURCE}|Organization|{org_id}",
        seq=1,
        provenance=_provenance("Organization", org_id, 1),
        record=OrganizationRecord(
            ods_code=ods,
            name=f"Org {ods}",
            part_of=f"{SOURCE}|Organization|{part_of}" if part_of else None,
        ),
    )


def recruiter_role(
    role_id: str, practitioner_name: str, org_id: str, display: str = "Clinical trial recruiter"
) -> ReferenceRecord:
    return ReferenceRecord(
        key=f"{SOURCE}|PractitionerRole|{role_id}",
        seq=1,
        provenance=_provenance("PractitionerRole", role_id, 1),
        record=PractitionerRoleRecord(
            practitioner=practitioner_key(practitioner_name),
            organization=f"{SOURCE}|Organization|{org_id}",
            codes=({"system": "http://snomed.info/sct", "code": "224535009", "display": display},),
        ),
    )


def as_json(model: Any) -> bytes:
    if hasattr(model, "to_json"):
        return bytes(model.to_json())
    return json.dumps(model.model_dump(mode="json", by_alias=True)).encode()


@dataclass
class Identities:
    """An identity source in memory that records what was read."""

    people: dict[str, dict[str, Any]] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)

    def get_identity(self, pseudonym: str) -> dict[str, Any] | None:
        self.reads.append(pseudonym)
        return self.people.get(pseudonym)
