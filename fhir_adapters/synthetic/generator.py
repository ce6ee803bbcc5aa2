"""The population: reference data (sites, GP practices, clinicians) and patients, one at a time.

Each patient's random stream is seeded from (seed, patient index) and every id is a UUID5 of the
same, so patient i is the same whichever patients are generated before it, output is
byte-identical for the same options, and memory does not grow with the population.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from fhir_adapters.uk_geography import _AREAS, REGIONS

from .catalogue import (
    BP_PANEL,
    CONDITIONS,
    DEFAULT_FAULTY_MODEL,
    DETECTED,
    DEVICE_CLASSES,
    DIASTOLIC,
    DMD,
    ICD10,
    INTERPRETATION,
    LABS,
    LOINC,
    MARKERS,
    MEDICATIONS,
    NOT_DETECTED,
    ONCOLOGY,
    OPCS4,
    SNOMED,
    STAGE_GROUP,
    STAGES,
    SYSTOLIC,
    UCUM,
    ConditionDef,
    DeviceClass,
)

Resource = dict[str, Any]
NAMESPACE = uuid.UUID("6f1c2d3e-8a4b-4c5d-9e6f-7a8b9c0d1e2f")
FAMILY = (
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Johnson",
    "Davies",
    "Patel",
    "Robinson",
    "Wright",
    "Thompson",
    "Evans",
    "Walker",
    "White",
    "Khan",
    "Hughes",
    "Edwards",
    "Green",
    "Hall",
    "Ali",
    "Wood",
    "Campbell",
    "Murphy",
)
GIVEN_F = (
    "Olivia",
    "Amelia",
    "Isla",
    "Ava",
    "Mia",
    "Grace",
    "Sophie",
    "Margaret",
    "Susan",
    "Fatima",
    "Emily",
    "Jane",
    "Priya",
    "Ruth",
    "Eileen",
    "Aisha",
)
GIVEN_M = (
    "Oliver",
    "George",
    "Harry",
    "Noah",
    "Jack",
    "Muhammad",
    "David",
    "John",
    "Peter",
    "James",
    "Raj",
    "Thomas",
    "William",
    "Ahmed",
    "Michael",
    "Robert",
)
#: Age bands (start, end, weight): an adult-skewed UK-like pyramid.
AGE_BANDS = (
    (0, 18, 0.21),
    (18, 30, 0.16),
    (30, 45, 0.20),
    (45, 60, 0.19),
    (60, 75, 0.15),
    (75, 95, 0.09),
)


@dataclass(frozen=True)
class GeneratorConfig:
    patients: int
    seed: int = 42
    as_of: date = date(2026, 1, 1)
    opt_out_rate: float = 0.03
    faulty_model: str = DEFAULT_FAULTY_MODEL
    faulty_multiplier: float = 4.0
    faulty_from: date = date(2023, 1, 1)
    sites: int | None = None
    #: Probability that an implant of a given class is done, for patients 55 and over.
    implant_rates: dict[str, float] = field(
        default_factory=lambda: {"hip": 0.04, "knee": 0.04, "pacemaker": 0.025, "insulin_pump": 0.0}
    )

    @property
    def site_count(self) -> int:
        return self.sites or max(5, min(200, self.patients // 1000))


def _id(config: GeneratorConfig, *parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, ":".join(str(p) for p in (config.seed, *parts))))


def nhs_number(rng: random.Random) -> str:
    """A 10-digit number with a valid Modulus 11 check digit (first digit 9: test range)."""
    while True:
        digits = [9] + [rng.randrange(10) for _ in range(8)]
        total = sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True))
        check = 11 - total % 11
        if check == 11:
            check = 0
        if check != 10:
            return "".join(map(str, digits)) + str(check)


def _postcode(rng: random.Random, region: str) -> str:
    area = rng.choice(_AREAS[region])
    letters = "ABDEFGHJLNPQRSTUWXYZ"
    return (
        f"{area}{rng.randint(1, 20)} {rng.randint(1, 9)}{rng.choice(letters)}{rng.choice(letters)}"
    )


@dataclass(frozen=True)
class Site:
    index: int
    org_id: str
    ods: str
    region: str
    practices: tuple[tuple[str, str], ...]  # (practice org id, GP practitioner id)
    consultant: str
    recruiter: str


def sites(config: GeneratorConfig) -> list[Site]:
    out = []
    for s in range(config.site_count):
        region = REGIONS[s % len(REGIONS)]
        practices = tuple(
            (_id(config, "practice", s, p), _id(config, "gp", s, p)) for p in range(3)
        )
        out.append(
            Site(
                s,
                _id(config, "site", s),
                f"R{s // 26 % 10}{chr(65 + s % 26)}{s % 9}",
                region,
                practices,
                _id(config, "consultant", s),
                _id(config, "recruiter", s),
            )
        )
    return out


def iter_reference_resources(config: GeneratorConfig) -> Iterator[Resource]:
    """Organisations (trusts and GP practices), clinicians and their roles."""
    for site in sites(config):
        rng = random.Random(f"{config.seed}:site:{site.index}")
        yield {
            "resourceType": "Organization",
            "id": site.org_id,
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": site.ods}
            ],
            "active": True,
            "type": [
                {
                    "coding": [
                        {
                            "system": "https://fhir.nhs.uk/CodeSystem/organisation-role",
                            "code": "197",
                            "display": "NHS Trust",
                        }
                    ]
                }
            ],
            "name": f"{site.region} Teaching Hospitals NHS Trust {site.index + 1}",
            "address": [{"city": site.region, "postalCode": _postcode(rng, site.region)}],
        }
        for p, (practice_id, gp_id) in enumerate(site.practices):
            yield {
                "resourceType": "Organization",
                "id": practice_id,
                "identifier": [
                    {
                        "system": "https://fhir.nhs.uk/Id/ods-organization-code",
                        "value": f"Y{site.index:03d}{p}",
                    }
                ],
                "active": True,
                "type": [
                    {
                        "coding": [
                            {
                                "system": "https://fhir.nhs.uk/CodeSystem/organisation-role",
                                "code": "76",
                                "display": "GP Practice",
                            }
                        ]
                    }
                ],
                "name": f"Practice {site.index + 1}-{p + 1}",
                "partOf": {"reference": f"Organization/{site.org_id}"},
                "address": [{"postalCode": _postcode(rng, site.region)}],
            }
            yield _practitioner(
                gp_id, f"Dr {rng.choice(GIVEN_F + GIVEN_M)} {rng.choice(FAMILY)}", rng
            )
            yield _role(
                _id(config, "gp-role", site.index, p),
                gp_id,
                practice_id,
                "62247001",
                "General practitioner",
            )
        yield _practitioner(site.consultant, f"Dr {rng.choice(GIVEN_F)} {rng.choice(FAMILY)}", rng)
        yield _role(
            _id(config, "consultant-role", site.index),
            site.consultant,
            site.org_id,
            "158965000",
            "Medical practitioner",
        )
        yield _practitioner(site.recruiter, f"{rng.choice(GIVEN_F)} {rng.choice(FAMILY)}", rng)
        role = _role(
            _id(config, "recruiter-role", site.index),
            site.recruiter,
            site.org_id,
            "224535009",
            "Registered nurse",
        )
        role["code"][0]["text"] = "trial recruiter"
        yield role


def _practitioner(pid: str, name: str, rng: random.Random) -> Resource:
    parts = name.split(" ")
    return {
        "resourceType": "Practitioner",
        "id": pid,
        "active": True,
        "identifier": [
            {
                "system": "https://fhir.hl7.org.uk/Id/gmc-number",
                "value": str(rng.randint(1_000_000, 9_999_999)),
            }
        ],
        "name": [
            {
                "family": parts[-1],
                "given": parts[-2:-1],
                **({"prefix": [parts[0]]} if parts[0] == "Dr" else {}),
            }
        ],
        "telecom": [
            {"system": "email", "value": f"{parts[-2].lower()}.{parts[-1].lower()}@nhs.example"}
        ],
    }


def _role(rid: str, practitioner: str, organization: str, code: str, display: str) -> Resource:
    return {
        "resourceType": "PractitionerRole",
        "id": rid,
        "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner}"},
        "organization": {"reference": f"Organization/{organization}"},
        "code": [{"coding": [{"system": SNOMED, "code": code, "display": display}]}],
    }


def _dt(day: date, rng: random.Random) -> str:
    return datetime(
        day.year, day.month, day.day, rng.randint(8, 17), rng.choice((0, 15, 30, 45))
    ).strftime("%Y-%m-%dT%H:%M:00+00:00")


def _cc(system: str, code: str, display: str) -> Resource:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


class _Patient:
    """Builds one patient's resources."""

    def __init__(self, config: GeneratorConfig, index: int, site_list: list[Site]) -> None:
        self.config = config
        self.index = index
        self.rng = random.Random(f"{config.seed}:{index}")
        self.pid = _id(config, "patient", index)
        self.ref = {"reference": f"Patient/{self.pid}"}
        self.site = site_list[self.rng.randrange(len(site_list))]
        self.resources: list[Resource] = []
        self.count = 0

    def rid(self, kind: str) -> str:
        self.count += 1
        return _id(self.config, kind, self.index, self.count)

    def day_between(self, start: date, end: date) -> date:
        span = max(0, (end - start).days)
        return start + timedelta(days=self.rng.randint(0, span))

    def build(self) -> list[Resource]:
        rng, as_of = self.rng, self.config.as_of
        lo, hi, _ = rng.choices(AGE_BANDS, weights=[b[2] for b in AGE_BANDS])[0]
        age = rng.randint(lo, hi - 1)
        self.age = age
        born = as_of - timedelta(days=age * 365 + rng.randint(0, 364))
        self.sex = rng.choice(("female", "male"))
        practice, gp = self.site.practices[rng.randrange(len(self.site.practices))]
        given = rng.choice(GIVEN_F if self.sex == "female" else GIVEN_M)
        self.resources.append(
            {
                "resourceType": "Patient",
                "id": self.pid,
                "meta": {"versionId": "1", "lastUpdated": f"{as_of.isoformat()}T00:00:00Z"},
                "identifier": [
                    {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number(rng)}
                ],
                "name": [{"use": "official", "family": rng.choice(FAMILY), "given": [given]}],
                "gender": self.sex,
                "birthDate": born.isoformat(),
                "address": [
                    {
                        "use": "home",
                        "line": [f"{rng.randint(1, 199)} High Street"],
                        "postalCode": _postcode(rng, self.site.region),
                    }
                ],
                "telecom": [
                    {"system": "phone", "value": f"07{rng.randint(100000000, 999999999)}"},
                    {"system": "email", "value": f"{given.lower()}{self.index}@mail.example"},
                ],
                "generalPractitioner": [
                    {"reference": f"Organization/{practice}"},
                    {"reference": f"Practitioner/{gp}"},
                ],
                "managingOrganization": {"reference": f"Organization/{self.site.org_id}"},
            }
        )
        if age >= 18:
            band = 0 if age < 40 else 1 if age < 60 else 2 if age < 75 else 3
            self.conditions = {
                c.key: self.condition(c)
                for c in CONDITIONS
                if rng.random() < c.prevalence[band]
                and not (c.key == "breast" and self.sex == "male")
            }
            self.labs()
            self.medications()
            for key in ONCOLOGY:
                if key in self.conditions:
                    self.oncology(key, self.conditions[key])
            if age >= 55:
                for device in DEVICE_CLASSES:
                    rate = self.config.implant_rates.get(device.key, 0.0)
                    if device.key == "insulin_pump" and "t2dm" in self.conditions:
                        rate = 0.05
                    if rng.random() < rate:
                        self.implant(device)
        if rng.random() < self.config.opt_out_rate:
            self.opt_out()
        return self.resources

    def condition(self, c: ConditionDef) -> date:
        onset = self.day_between(
            self.config.as_of - timedelta(days=3650), self.config.as_of - timedelta(days=30)
        )
        self.resources.append(
            {
                "resourceType": "Condition",
                "id": self.rid("condition"),
                "clinicalStatus": _cc(
                    "http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"
                ),
                "verificationStatus": _cc(
                    "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "confirmed",
                    "Confirmed",
                ),
                "code": {
                    "coding": [
                        {"system": SNOMED, "code": c.snomed, "display": c.display},
                        {"system": ICD10, "code": c.icd10, "display": c.display},
                    ],
                    "text": c.display,
                },
                "subject": self.ref,
                "onsetDateTime": _dt(onset, self.rng),
                "recordedDate": _dt(onset, self.rng),
            }
        )
        return onset

    def observation(
        self,
        key: str,
        value: float,
        when: date,
        category: str = "laboratory",
        high: float | None = None,
        low: float | None = None,
    ) -> None:
        system, code, display, unit = LABS[key]
        obs: Resource = {
            "resourceType": "Observation",
            "id": self.rid("obs"),
            "status": "final",
            "category": [
                _cc(
                    "http://terminology.hl7.org/CodeSystem/observation-category", category, category
                )
            ],
            "code": _cc(system, code, display),
            "subject": self.ref,
            "effectiveDateTime": _dt(when, self.rng),
            "valueQuantity": {"value": round(value, 1), "unit": unit, "system": UCUM, "code": unit},
        }
        flag = (
            "H"
            if high is not None and value > high
            else "L"
            if low is not None and value < low
            else None
        )
        if flag:
            obs["interpretation"] = [_cc(INTERPRETATION, flag, "High" if flag == "H" else "Low")]
        self.resources.append(obs)

    def labs(self) -> None:
        rng, as_of, c = self.rng, self.config.as_of, self.conditions
        chronic = bool(c)
        visits = rng.randint(2, 4) if chronic else (1 if rng.random() < 0.5 else 0)
        for v in range(visits):
            when = as_of - timedelta(days=rng.randint(5, 365) + v * 200)
            if "t2dm" in c or rng.random() < 0.3:
                hba1c = rng.gauss(66 if "t2dm" in c else 37, 12 if "t2dm" in c else 4)
                if rng.random() < 0.15:
                    self.observation("hba1c_pct", max(4.0, hba1c / 10.929 + 2.15), when, high=6.5)
                else:
                    self.observation("hba1c_mmol", max(20.0, hba1c), when, high=48)
            if "ckd3" in c or "t2dm" in c or "htn" in c or rng.random() < 0.3:
                egfr = rng.gauss(42, 8) if "ckd3" in c else rng.gauss(85, 12)
                if "ckd3" in c and rng.random() < 0.1:
                    egfr = rng.uniform(12, 29)
                self.observation("egfr", max(5.0, egfr), when, low=60)
            if rng.random() < 0.6:
                ldl = max(0.8, rng.gauss(3.0 if "mi" not in c else 2.2, 0.8))
                if rng.random() < 0.2:
                    self.observation("ldl_mg", ldl * 38.67, when, high=116)
                else:
                    self.observation("ldl_mmol", ldl, when, high=3.0)
                self.observation("chol", ldl + rng.uniform(1.2, 2.2), when, high=5.0)
            self.observation(
                "bmi",
                max(16.0, rng.gauss(29 if "t2dm" in c else 26, 4)),
                when,
                category="vital-signs",
                high=30,
            )
            self.blood_pressure(when, "htn" in c)

    def blood_pressure(self, when: date, hypertensive: bool) -> None:
        rng = self.rng
        sys_v = round(rng.gauss(148 if hypertensive else 124, 12))
        dia_v = round(rng.gauss(90 if hypertensive else 78, 8))

        def component(code: tuple[str, str], value: int, high: int) -> Resource:
            comp: Resource = {
                "code": _cc(LOINC, *code),
                "valueQuantity": {
                    "value": value,
                    "unit": "mm[Hg]",
                    "system": UCUM,
                    "code": "mm[Hg]",
                },
            }
            if value > high:
                comp["interpretation"] = [_cc(INTERPRETATION, "H", "High")]
            return comp

        self.resources.append(
            {
                "resourceType": "Observation",
                "id": self.rid("bp"),
                "status": "final",
                "category": [
                    _cc(
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        "vital-signs",
                        "vital-signs",
                    )
                ],
                "code": _cc(LOINC, *BP_PANEL),
                "subject": self.ref,
                "effectiveDateTime": _dt(when, self.rng),
                "component": [component(SYSTOLIC, sys_v, 140), component(DIASTOLIC, dia_v, 90)],
            }
        )

    def medications(self) -> None:
        rng = self.rng
        for _key, code, display, treats, p in MEDICATIONS:
            onsets = [self.conditions[t] for t in treats if t in self.conditions]
            if not onsets or rng.random() >= p:
                continue
            start = self.day_between(min(onsets), self.config.as_of - timedelta(days=1))
            base: Resource = {"id": self.rid("med"), "subject": self.ref}
            concept = _cc(DMD, code, display)
            if rng.random() < 0.85:
                self.resources.append(
                    {
                        **base,
                        "resourceType": "MedicationRequest",
                        "status": "active",
                        "intent": "order",
                        "medicationCodeableConcept": concept,
                        "authoredOn": _dt(start, rng),
                    }
                )
            else:
                self.resources.append(
                    {
                        **base,
                        "resourceType": "MedicationStatement",
                        "status": "active",
                        "medicationCodeableConcept": concept,
                        "effectiveDateTime": _dt(start, rng),
                    }
                )

    def oncology(self, key: str, onset: date) -> None:
        rng = self.rng
        stage = rng.choices(STAGES, weights=(2, 2, 1.5, 1.5, 3))[0]
        self.resources.append(
            {
                "resourceType": "Observation",
                "id": self.rid("stage"),
                "status": "final",
                "category": [
                    _cc(
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        "laboratory",
                        "laboratory",
                    )
                ],
                "code": _cc(LOINC, *STAGE_GROUP),
                "subject": self.ref,
                "effectiveDateTime": _dt(onset, rng),
                "valueCodeableConcept": _cc("http://cancerstaging.org", stage, f"Stage {stage}"),
            }
        )
        for code, display, p in MARKERS[key]:
            answer = DETECTED if rng.random() < p else NOT_DETECTED
            self.resources.append(
                {
                    "resourceType": "Observation",
                    "id": self.rid("marker"),
                    "status": "final",
                    "category": [
                        _cc(
                            "http://terminology.hl7.org/CodeSystem/observation-category",
                            "laboratory",
                            "laboratory",
                        )
                    ],
                    "code": _cc(LOINC, code, display),
                    "subject": self.ref,
                    "effectiveDateTime": _dt(onset + timedelta(days=14), rng),
                    "valueCodeableConcept": _cc(*answer),
                }
            )

    def implant(self, device: DeviceClass) -> None:
        rng, config = self.rng, self.config
        manufacturer, model = rng.choice(device.models)
        implanted = self.day_between(
            config.as_of - timedelta(days=8 * 365), config.as_of - timedelta(days=7)
        )
        device_id = self.rid("device")
        lot = f"L{rng.randint(2015, 2025)}{rng.randint(100, 999)}"
        udi = f"0{rng.randint(10**12, 10**13 - 1)}"
        self.resources.append(
            {
                "resourceType": "Device",
                "id": device_id,
                "status": "active",
                "udiCarrier": [{"deviceIdentifier": udi, "carrierHRF": f"(01){udi}(10){lot}"}],
                "manufacturer": manufacturer,
                "lotNumber": lot,
                "modelNumber": model,
                "deviceName": [{"name": model, "type": "model-name"}],
                "type": _cc(SNOMED, device.snomed, device.display),
                "patient": self.ref,
            }
        )
        device_ref = {"reference": f"Device/{device_id}"}
        self.resources.append(
            {
                "resourceType": "Procedure",
                "id": self.rid("implant"),
                "status": "completed",
                "code": {
                    "coding": [
                        {
                            "system": OPCS4,
                            "code": device.implant_opcs,
                            "display": device.implant_display,
                        },
                        {
                            "system": SNOMED,
                            "code": device.implant_snomed,
                            "display": device.implant_display,
                        },
                    ],
                    "text": device.implant_display,
                },
                "subject": self.ref,
                "performedDateTime": _dt(implanted, rng),
                "focalDevice": [{"manipulated": device_ref}],
            }
        )
        self.resources.append(
            {
                "resourceType": "DeviceUseStatement",
                "id": self.rid("dus"),
                "status": "active",
                "subject": self.ref,
                "device": device_ref,
                "timingDateTime": _dt(implanted, rng),
                "recordedOn": _dt(implanted, rng),
            }
        )
        rate = device.outcome_rate
        if model == config.faulty_model and implanted >= config.faulty_from:
            rate *= config.faulty_multiplier
        if rng.random() < rate:
            when = self.day_between(
                implanted + timedelta(days=7), min(config.as_of, implanted + timedelta(days=365))
            )
            self.resources.append(
                {
                    "resourceType": "Procedure",
                    "id": self.rid("revision"),
                    "status": "completed",
                    "code": {
                        "coding": [
                            {
                                "system": OPCS4,
                                "code": device.outcome_opcs,
                                "display": device.outcome_display,
                            },
                            {
                                "system": SNOMED,
                                "code": device.outcome_snomed,
                                "display": device.outcome_display,
                            },
                        ],
                        "text": device.outcome_display,
                    },
                    "subject": self.ref,
                    "performedDateTime": _dt(when, rng),
                    "focalDevice": [{"manipulated": device_ref}],
                }
            )
            if rng.random() < 0.85:
                self.resources.append(
                    {
                        "resourceType": "AdverseEvent",
                        "id": self.rid("ae"),
                        "actuality": "actual",
                        "subject": self.ref,
                        "event": _cc(
                            ICD10, device.outcome_icd10, f"Complication of {device.display.lower()}"
                        ),
                        "date": _dt(when, rng),
                        "seriousness": _cc(
                            "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                            "serious",
                            "Serious",
                        ),
                        "suspectEntity": [{"instance": device_ref}],
                    }
                )

    def opt_out(self) -> None:
        when = self.day_between(
            self.config.as_of - timedelta(days=1500), self.config.as_of - timedelta(days=1)
        )
        self.resources.append(
            {
                "resourceType": "Consent",
                "id": self.rid("consent"),
                "status": "active",
                "scope": _cc(
                    "http://terminology.hl7.org/CodeSystem/consentscope", "research", "Research"
                ),
                "category": [_cc(LOINC, "59284-0", "Patient Consent")],
                "patient": self.ref,
                "dateTime": _dt(when, self.rng),
                "policyRule": _cc(
                    "https://fhir.nhs.uk/CodeSystem/national-data-opt-out",
                    "opt-out",
                    "National Data Opt-out",
                ),
                "provision": {"type": "deny"},
            }
        )


def iter_patients(config: GeneratorConfig, start: int = 0) -> Iterator[list[Resource]]:
    """Each patient's resources, Patient first, for indexes start..patients-1."""
    site_list = sites(config)
    for index in range(start, config.patients):
        yield _Patient(config, index, site_list).build()
