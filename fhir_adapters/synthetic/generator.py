"""The population: reference data (sites, GP practices, clinicians) and patients, one at a time.

Each patient's random stream is seeded from (seed, patient index) and every id is a UUID5 of the
same, so patient *i* is the same whichever patients are generated before it, output is
byte-identical for the same options, the work could be split across processes, and memory does
not grow with the population. All dates are relative to ``GeneratorConfig.as_of``.
"""

from __future__ import annotations

import random
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from fhir_adapters.uk_geography import _AREAS, REGIONS

from .catalogue import (
    ACT_REASON,
    AE_CATEGORY,
    AE_SERIOUSNESS,
    AJCC,
    BP_PANEL,
    CKD_STAGES,
    CONDITION_CATEGORY,
    CONDITION_CLINICAL,
    CONDITION_PROCEDURES,
    CONDITION_VERIFICATION,
    CONDITIONS,
    CONSENT_SCOPE,
    DEFAULT_FAULTY_MODEL,
    DETECTED,
    DEVICE_CLASSES,
    DIASTOLIC,
    DMD,
    GMC,
    GMP,
    ICD10,
    INTERPRETATION,
    LABS,
    LOINC,
    MARKERS,
    MEDICATIONS,
    NATIONAL_DATA_OPT_OUT,
    NEGATIVE,
    NHS_NUMBER,
    NMC,
    NOT_DETECTED,
    OBS_CATEGORY,
    ODS,
    ONCOLOGY,
    OPCS4,
    ORG_ROLE,
    OSIMERTINIB,
    PEMBROLIZUMAB,
    POSITIVE,
    POST_TOWNS,
    REGION_WEIGHTS,
    SNOMED,
    STAGE_GROUP,
    STAGES,
    SYSTOLIC,
    UCUM,
    ConditionDef,
    DeviceClass,
    ProcedureDef,
)

Resource = dict[str, Any]
NAMESPACE = uuid.UUID("6f1c2d3e-8a4b-4c5d-9e6f-7a8b9c0d1e2f")

FAMILY = (
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel",
    "Robinson", "Wright", "Thompson", "Evans", "Walker", "White", "Khan", "Hughes", "Edwards",
    "Green", "Hall", "Ali", "Wood", "Campbell", "Murphy", "Roberts", "Lewis", "Jackson", "Clarke",
    "Harris", "Martin", "Cooper", "King", "Lee", "Baker", "Shah", "Hussain", "Morgan", "Kaur",
    "Singh", "Stewart", "MacDonald", "Kelly", "O'Neill", "Begum", "Nowak", "Okafor", "Mensah",
)  # fmt: skip
GIVEN_F = (
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Grace", "Sophie", "Margaret", "Susan", "Fatima",
    "Emily", "Jane", "Priya", "Ruth", "Eileen", "Aisha", "Sarah", "Claire", "Helen", "Joan",
    "Patricia", "Chloe", "Zara", "Hannah", "Niamh", "Siobhan", "Agnieszka", "Amara", "Lucy",
)  # fmt: skip
GIVEN_M = (
    "Oliver", "George", "Harry", "Noah", "Jack", "Muhammad", "David", "John", "Peter", "James",
    "Raj", "Thomas", "William", "Ahmed", "Michael", "Robert", "Paul", "Mark", "Andrew", "Ian",
    "Kevin", "Daniel", "Samuel", "Callum", "Rhys", "Sean", "Tomasz", "Kwame", "Arjun",
)  # fmt: skip
STREETS = (
    "High Street", "Station Road", "Church Lane", "Victoria Road", "Green Lane", "Manor Road",
    "Park Road", "Queens Road", "The Crescent", "Mill Lane", "Kings Road", "New Street",
)  # fmt: skip
#: Age bands (start, end, weight): a UK-like pyramid (ONS mid-year estimates, roughly).
AGE_BANDS = (
    (0, 18, 0.21),
    (18, 30, 0.16),
    (30, 45, 0.20),
    (45, 60, 0.19),
    (60, 75, 0.15),
    (75, 100, 0.09),
)
PRACTICE_KINDS = ("Surgery", "Medical Centre", "Health Centre")
_AGE_WEIGHTS = tuple(b[2] for b in AGE_BANDS)
_PC_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"
_LAB_HIGH = {"code": "H", "display": "High"}
_LAB_LOW = {"code": "L", "display": "Low"}
_LAB_NORMAL = {"code": "N", "display": "Normal"}


@dataclass(frozen=True)
class FaultyDevice:
    """One device model whose outcome rate is multiplied for implants from ``from_date``."""

    model: str = DEFAULT_FAULTY_MODEL
    multiplier: float = 4.0
    from_date: date = date(2023, 1, 1)


#: Implants for every patient of 55 and over (insulin pumps: diabetics of 55 and over): a
#: device-heavy population, so a few thousand patients give each hip model a hundred or more
#: implants and the faulty model's signal shows (the demo, device tests and benchmarks use it).
DENSE_IMPLANT_RATES: dict[str, float] = {
    "hip": 1.0,
    "knee": 0.6,
    "pacemaker": 0.6,
    "insulin_pump": 1.0,
}


@dataclass(frozen=True)
class GeneratorConfig:
    patients: int
    seed: int = 42
    as_of: date = date(2026, 1, 1)
    opt_out_rate: float = 0.03
    faulty: FaultyDevice = field(default_factory=FaultyDevice)
    #: number of sites; default ``max(5, min(200, patients // 1000))``
    sites: int | None = None
    #: years of history behind ``as_of`` (condition onsets, measurements, implants)
    history_years: int = 10
    #: probability of an implant of each class, for patients 55 and over (insulin pumps: for
    #: diabetics 55 and over)
    implant_rates: dict[str, float] = field(
        default_factory=lambda: {
            "hip": 0.04,
            "knee": 0.04,
            "pacemaker": 0.025,
            "insulin_pump": 0.05,
        }
    )

    @property
    def site_count(self) -> int:
        return self.sites or max(5, min(200, self.patients // 1000))

    @property
    def last_updated(self) -> str:
        return f"{self.as_of.isoformat()}T00:00:00+00:00"


def _id(config: GeneratorConfig, *parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, ":".join(str(p) for p in (config.seed, *parts))))


# --------------------------------------------------------------------------- identifiers


def nhs_check_digit(body: str) -> int | None:
    """The Modulus 11 check digit of 9 digits, or None when the body cannot be used (10)."""
    total = sum(int(d) * w for d, w in zip(body, range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


def is_valid_nhs_number(number: str) -> bool:
    if len(number) != 10 or not number.isdigit():
        return False
    return nhs_check_digit(number[:9]) == int(number[9])


_NHS_SLOTS = 50_000_000
_NHS_STRIDE = 7_919_993  # coprime to _NHS_SLOTS: a bijection index -> slot


def nhs_number(index: int, seed: int = 0) -> str:
    """A unique, valid NHS number for patient ``index`` (starting 9, outside issued ranges).

    Slot ``s`` holds the bodies 9xxxxxxx(2s) and (2s + 1); their weighted sums differ by 2, so at
    most one of them lacks a check digit, and different indexes never share a slot.
    """
    slot = (index * _NHS_STRIDE + seed * 104_729) % _NHS_SLOTS
    for k in (0, 1):
        body = str(900_000_000 + 2 * slot + k)
        check = nhs_check_digit(body)
        if check is not None:
            return body + str(check)
    raise AssertionError("unreachable: one of two adjacent bodies has a check digit")


def _gtin(model: str) -> str:
    """A stable GS1 GTIN-14 (device identifier) per model, with its mod-10 check digit."""
    body = f"05{zlib.crc32(model.encode()) % 10**11:011d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return body + str((10 - total % 10) % 10)


def _postcode(rng: random.Random, area: str) -> str:
    letters = _PC_LETTERS
    return (
        f"{area}{rng.randint(1, 20)} {rng.randint(1, 9)}{rng.choice(letters)}{rng.choice(letters)}"
    )


def _dt(day: date, rng: random.Random) -> str:
    return f"{day.isoformat()}T{rng.randint(8, 17):02d}:{rng.choice((0, 15, 30, 45)):02d}:00+00:00"


def _cc(system: str, code: str, display: str) -> Resource:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _ref(kind: str, rid: str) -> Resource:
    return {"reference": f"{kind}/{rid}"}


# --------------------------------------------------------------------------- reference data


@dataclass(frozen=True)
class Practice:
    org_id: str
    ods: str
    gps: tuple[str, ...]  # Practitioner ids


@dataclass(frozen=True)
class Site:
    index: int
    org_id: str
    ods: str
    name: str
    region: str
    area: str
    town: str
    practices: tuple[Practice, ...]
    consultant: str
    recruiter: str


_TRUST_LETTERS = "ABCDEFGHJKLMNPQRTVWXY"


def _site_name(region: str, town: str, rng: random.Random) -> str:
    if region == "Scotland":
        return f"NHS {town} Health Board"
    if region == "Wales":
        return f"{town} University Health Board"
    if region == "Northern Ireland":
        return f"{town} Health and Social Care Trust"
    return f"{town} {rng.choice(('Teaching Hospitals', 'University Hospitals', 'Hospitals'))} " + (
        "NHS Foundation Trust" if rng.random() < 0.7 else "NHS Trust"
    )


def sites(config: GeneratorConfig) -> list[Site]:
    """The sites (trusts / health boards), each with GP practices, a consultant and a recruiter."""
    out = []
    regions = list(REGION_WEIGHTS)
    weights = list(REGION_WEIGHTS.values())
    for s in range(config.site_count):
        rng = random.Random(f"{config.seed}:site-layout:{s}")
        # the first sites cover every region, the rest follow the population
        region = REGIONS[s] if s < len(REGIONS) else rng.choices(regions, weights)[0]
        area = rng.choice(_AREAS[region])
        town = POST_TOWNS.get(area, region)
        practices = tuple(
            Practice(
                _id(config, "practice", s, p),
                f"{'ABCDEFGHJKLMNPY'[s % 15]}{80_000 + 20 * s + p:05d}",
                tuple(_id(config, "gp", s, p, g) for g in range(2)),
            )
            for p in range(rng.randint(3, 6))
        )
        out.append(
            Site(
                index=s,
                org_id=_id(config, "site", s),
                ods=f"R{_TRUST_LETTERS[s // 10 % 21]}{s % 10}",
                name=_site_name(region, town, rng),
                region=region,
                area=area,
                town=town,
                practices=practices,
                consultant=_id(config, "consultant", s),
                recruiter=_id(config, "recruiter", s),
            )
        )
    return out


def _organization(
    oid: str, ods: str, name: str, role: tuple[str, str], address: Resource
) -> Resource:
    return {
        "resourceType": "Organization",
        "id": oid,
        "identifier": [{"system": ODS, "value": ods}],
        "active": True,
        "type": [_cc(ORG_ROLE, *role)],
        "name": name,
        "address": [address],
    }


def iter_reference_resources(config: GeneratorConfig) -> Iterator[Resource]:
    """Organisations (trusts and GP practices), clinicians and their roles."""
    for site in sites(config):
        rng = random.Random(f"{config.seed}:site:{site.index}")
        yield _organization(
            site.org_id,
            site.ods,
            site.name,
            ("197", "NHS TRUST"),
            {
                "use": "work",
                "line": [f"{rng.choice(STREETS)}"],
                "city": site.town,
                "postalCode": _postcode(rng, site.area),
                "country": "GB",
            },
        )
        for p, practice in enumerate(site.practices):
            family = rng.choice(FAMILY)
            org = _organization(
                practice.org_id,
                practice.ods,
                f"{rng.choice(STREETS).split()[0]} {rng.choice(PRACTICE_KINDS)} "
                f"({family} and Partners)",
                ("76", "GP PRACTICE"),
                {
                    "use": "work",
                    "line": [f"{rng.randint(1, 120)} {rng.choice(STREETS)}"],
                    "city": site.town,
                    "postalCode": _postcode(rng, site.area),
                    "country": "GB",
                },
            )
            org["partOf"] = _ref("Organization", site.org_id)
            yield org
            for g, gp in enumerate(practice.gps):
                yield _practitioner(gp, rng, GMP, f"G{rng.randint(1_000_000, 9_999_999)}", "Dr")
                yield _role(
                    _id(config, "gp-role", site.index, p, g),
                    gp,
                    practice.org_id,
                    ("62247001", "General practitioner"),
                )
        yield _practitioner(site.consultant, rng, GMC, str(rng.randint(1_000_000, 9_999_999)), "Dr")
        yield _role(
            _id(config, "consultant-role", site.index),
            site.consultant,
            site.org_id,
            ("158967008", "Consultant physician"),
        )
        nmc = f"{rng.randint(10, 99)}{rng.choice('ABCDEFGHIJ')}{rng.randint(1000, 9999)}E"
        yield _practitioner(site.recruiter, rng, NMC, nmc, None)
        role = _role(
            _id(config, "recruiter-role", site.index),
            site.recruiter,
            site.org_id,
            ("224535009", "Registered nurse"),
        )
        role["code"].append({"text": "Research nurse - clinical trial recruiter"})
        yield role


def _practitioner(
    pid: str, rng: random.Random, system: str, number: str, prefix: str | None
) -> Resource:
    female = rng.random() < 0.55
    given = rng.choice(GIVEN_F if female else GIVEN_M)
    family = rng.choice(FAMILY)
    name: Resource = {"use": "official", "family": family, "given": [given]}
    if prefix:
        name["prefix"] = [prefix]
    email = f"{given.lower()}.{family.lower().replace(chr(39), '')}{rng.randint(1, 99)}@nhs.example"
    return {
        "resourceType": "Practitioner",
        "id": pid,
        "active": True,
        "identifier": [{"system": system, "value": number}],
        "name": [name],
        "telecom": [{"system": "email", "value": email, "use": "work"}],
        "gender": "female" if female else "male",
    }


def _role(rid: str, practitioner: str, organization: str, code: tuple[str, str]) -> Resource:
    return {
        "resourceType": "PractitionerRole",
        "id": rid,
        "active": True,
        "practitioner": _ref("Practitioner", practitioner),
        "organization": _ref("Organization", organization),
        "code": [_cc(SNOMED, *code)],
    }


# --------------------------------------------------------------------------- patients


class _Patient:
    """Builds one patient's resources."""

    def __init__(self, config: GeneratorConfig, index: int, site_list: list[Site]) -> None:
        self.config = config
        self.index = index
        self.rng = random.Random(f"{config.seed}:{index}")
        self.pid = _id(config, "patient", index)
        self.ref = _ref("Patient", self.pid)
        self.site = site_list[self.rng.randrange(len(site_list))]
        self.resources: list[Resource] = []
        self.count = 0
        self.as_of = config.as_of
        self.history_start = config.as_of - timedelta(days=365 * config.history_years)
        self.conditions: dict[str, date] = {}
        self.meds: dict[str, date] = {}

    def rid(self, kind: str) -> str:
        self.count += 1
        return _id(self.config, kind, self.index, self.count)

    def day_between(self, start: date, end: date) -> date:
        span = (end - start).days
        return start + timedelta(days=self.rng.randint(0, span)) if span > 0 else start

    # ------------------------------------------------------------------ demographics

    def build(self) -> list[Resource]:
        rng, as_of, site = self.rng, self.as_of, self.site
        lo, hi, _ = rng.choices(AGE_BANDS, weights=_AGE_WEIGHTS)[0]
        age = rng.randint(lo, hi - 1)
        self.age = age
        self.born = as_of - timedelta(days=age * 365 + age // 4 + rng.randint(1, 364))
        self.adult_from = max(self.history_start, self.born + timedelta(days=365 * 18 + 5))
        self.sex = rng.choice(("female", "male"))
        practice = site.practices[rng.randrange(len(site.practices))]
        self.gp = practice.gps[rng.randrange(len(practice.gps))]
        given = rng.choice(GIVEN_F if self.sex == "female" else GIVEN_M)
        family = rng.choice(FAMILY)
        area = site.area if rng.random() < 0.75 else rng.choice(_AREAS[site.region])
        name: Resource = {"use": "official", "family": family, "given": [given]}
        if age >= 18:
            name["prefix"] = ["Mr" if self.sex == "male" else rng.choice(("Mrs", "Ms", "Miss"))]
        handle = f"{given.lower()}.{family.lower().replace(chr(39), '')}{self.index}"
        self.resources.append(
            {
                "resourceType": "Patient",
                "id": self.pid,
                "meta": {"versionId": "1", "lastUpdated": self.config.last_updated},
                "identifier": [
                    {"system": NHS_NUMBER, "value": nhs_number(self.index, self.config.seed)}
                ],
                "active": True,
                "name": [name],
                "telecom": [
                    {
                        "system": "phone",
                        "value": f"07{rng.randint(700_000_000, 999_999_999)}",
                        "use": "mobile",
                    },
                    {"system": "email", "value": f"{handle}@mail.example", "use": "home"},
                ],
                "gender": self.sex,
                "birthDate": self.born.isoformat(),
                "address": [
                    {
                        "use": "home",
                        "line": [f"{rng.randint(1, 199)} {rng.choice(STREETS)}"],
                        "city": POST_TOWNS.get(area, site.town),
                        "postalCode": _postcode(rng, area),
                        "country": "GB",
                    }
                ],
                "generalPractitioner": [
                    _ref("Organization", practice.org_id),
                    _ref("Practitioner", self.gp),
                ],
                "managingOrganization": _ref("Organization", site.org_id),
            }
        )
        if age >= 18:
            band = 0 if age < 40 else 1 if age < 60 else 2 if age < 75 else 3
            for c in CONDITIONS:
                if c.key == "breast" and self.sex == "male":
                    continue
                if rng.random() < c.prevalence[band]:
                    self.conditions[c.key] = self.condition(c)
            self.medications()
            for key in ONCOLOGY:
                if key in self.conditions:
                    self.oncology(key, self.conditions[key])
            for key, p, procedure in CONDITION_PROCEDURES:
                if key in self.conditions and rng.random() < p:
                    when = self.day_between(
                        self.conditions[key] + timedelta(days=1),
                        min(as_of, self.conditions[key] + timedelta(days=90)),
                    )
                    self.procedure(procedure, when)
            self.labs()
            if age >= 55:
                for device in DEVICE_CLASSES:
                    rate = self.config.implant_rates.get(device.key, 0.0)
                    if device.key == "insulin_pump" and "t2dm" not in self.conditions:
                        rate = 0.0
                    if rng.random() < rate:
                        self.implant(device)
        if rng.random() < self.config.opt_out_rate:
            self.opt_out()
        return self.resources

    # ------------------------------------------------------------------ conditions

    def condition(self, c: ConditionDef) -> date:
        rng = self.rng
        onset = self.day_between(self.adult_from, self.as_of - timedelta(days=30))
        snomed, icd10, display = c.snomed, c.icd10, c.display
        if c.key == "ckd":
            stage = rng.choices(list(CKD_STAGES), [v[3] for v in CKD_STAGES.values()])[0]
            snomed, icd10, display = CKD_STAGES[stage][:3]
            self.ckd_stage = stage
        recorded = min(self.as_of, onset + timedelta(days=rng.randint(0, 21)))
        self.resources.append(
            {
                "resourceType": "Condition",
                "id": self.rid("condition"),
                "clinicalStatus": _cc(CONDITION_CLINICAL, "active", "Active"),
                "verificationStatus": _cc(CONDITION_VERIFICATION, "confirmed", "Confirmed"),
                "category": [_cc(CONDITION_CATEGORY, "problem-list-item", "Problem List Item")],
                "code": {
                    "coding": [
                        {"system": SNOMED, "code": snomed, "display": display},
                        {"system": ICD10, "code": icd10, "display": display},
                    ],
                    "text": display,
                },
                "subject": self.ref,
                "onsetDateTime": _dt(onset, rng),
                "recordedDate": _dt(recorded, rng),
                "recorder": _ref("Practitioner", self.gp),
            }
        )
        return onset

    # ------------------------------------------------------------------ medications

    def medications(self) -> None:
        rng = self.rng
        for med in MEDICATIONS:
            onsets = [self.conditions[t] for t in med.treats if t in self.conditions]
            if not onsets or rng.random() >= med.probability:
                continue
            start = self.day_between(min(onsets), self.as_of - timedelta(days=1))
            self.meds[med.key] = start
            self.medication(med.dmd, med.display, med.dose, start)

    def medication(self, code: str, display: str, dose: str, start: date) -> None:
        rng = self.rng
        concept = _cc(DMD, code, display)
        if rng.random() < 0.85:
            self.resources.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": self.rid("medreq"),
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": concept,
                    "subject": self.ref,
                    "authoredOn": _dt(start, rng),
                    "requester": _ref("Practitioner", self.gp),
                    "dosageInstruction": [{"text": dose}],
                }
            )
        else:
            self.resources.append(
                {
                    "resourceType": "MedicationStatement",
                    "id": self.rid("medstmt"),
                    "status": "active",
                    "medicationCodeableConcept": concept,
                    "subject": self.ref,
                    "effectiveDateTime": _dt(start, rng),
                    "dateAsserted": _dt(self.day_between(start, self.as_of), rng),
                    "dosage": [{"text": dose}],
                }
            )

    # ------------------------------------------------------------------ observations

    def observation(self, key: str, value: float, when: date, category: str) -> None:
        code, display, unit, low, high = LABS[key]
        value = round(value, 1)
        obs: Resource = {
            "resourceType": "Observation",
            "id": self.rid("obs"),
            "status": "final",
            "category": [_cc(OBS_CATEGORY, category, _CATEGORY_DISPLAY[category])],
            "code": _cc(LOINC, code, display),
            "subject": self.ref,
            "effectiveDateTime": _dt(when, self.rng),
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        }
        flag = (
            _LAB_HIGH
            if high is not None and value > high
            else _LAB_LOW
            if low is not None and value < low
            else _LAB_NORMAL
        )
        obs["interpretation"] = [
            {
                "coding": [{"system": INTERPRETATION, **flag}],
                "text": flag["display"],
            }
        ]
        self.resources.append(obs)

    def labs(self) -> None:
        """Measurements over time, from per-patient baselines shaped by conditions and drugs."""
        rng, as_of, c, age = self.rng, self.as_of, self.conditions, self.age
        chronic = bool(c)
        if chronic:
            first = max(self.adult_from, min(c.values()))
            visits = sorted(
                self.day_between(first, as_of - timedelta(days=3)) for _ in range(rng.randint(3, 6))
            )
        else:
            visits = sorted(
                self.day_between(as_of - timedelta(days=3 * 365), as_of - timedelta(days=3))
                for _ in range(rng.choice((0, 1, 1, 2)))
            )
        if not visits:
            return
        diabetic = "t2dm" in c
        hba1c = rng.gauss(64, 10) if diabetic else rng.gauss(37, 4)
        hba1c_key = "hba1c_pct" if rng.random() < 0.15 else "hba1c_mmol"
        if "ckd" in c:
            _, _, _, _, mean, sd = CKD_STAGES[self.ckd_stage]
            egfr = rng.gauss(mean, sd)
        else:
            egfr = max(62.0, rng.gauss(105 - 0.5 * age, 10))
        egfr_key = "egfr_ckdepi" if rng.random() < 0.7 else "egfr_mdrd"
        ldl = max(1.2, rng.gauss(3.2, 0.8))
        ldl_key = "ldl_mg" if rng.random() < 0.2 else "ldl_mmol"
        hypertensive = "htn" in c
        systolic = rng.gauss(148, 10) if hypertensive else rng.gauss(112 + 0.25 * age, 9)
        diastolic = rng.gauss(90, 7) if hypertensive else rng.gauss(74, 6)
        bmi = max(17.0, rng.gauss(31 if diabetic else 27, 4.5))
        statin = min(
            (self.meds[k] for k in ("atorvastatin", "simvastatin") if k in self.meds),
            default=None,
        )
        metformin = self.meds.get("metformin")
        years = 0.0
        for when in visits:
            years = (when - visits[0]).days / 365.25
            if diabetic or rng.random() < 0.25:
                value = hba1c + rng.gauss(0, 3)
                if metformin and when >= metformin:
                    value -= 7
                value = max(25.0, value)
                if hba1c_key == "hba1c_pct":
                    value = value / 10.929 + 2.15  # IFCC mmol/mol -> NGSP %
                self.observation(hba1c_key, value, when, "laboratory")
            if {"ckd", "t2dm", "htn", "hf"} & c.keys() or rng.random() < 0.25:
                decline = 2.0 if "ckd" in c else 0.8
                value = max(4.0, egfr - decline * years + rng.gauss(0, 3))
                self.observation(egfr_key, value, when, "laboratory")
            if {"t2dm", "htn", "mi", "ckd"} & c.keys() or rng.random() < 0.35:
                ldl_now = ldl * (0.62 if statin and when >= statin else 1.0)
                ldl_now = max(0.6, ldl_now + rng.gauss(0, 0.25))
                self.observation(
                    ldl_key, ldl_now * 38.67 if ldl_key == "ldl_mg" else ldl_now, when, "laboratory"
                )
                self.observation("chol", ldl_now + rng.uniform(1.3, 2.1), when, "laboratory")
            self.observation("bmi", bmi + rng.gauss(0, 0.6), when, "vital-signs")
            self.blood_pressure(
                when, round(systolic + rng.gauss(0, 7)), round(diastolic + rng.gauss(0, 5))
            )

    def blood_pressure(self, when: date, systolic: int, diastolic: int) -> None:
        def component(code: tuple[str, str], value: int, low: int, high: int) -> Resource:
            flag = _LAB_HIGH if value > high else _LAB_LOW if value < low else _LAB_NORMAL
            return {
                "code": _cc(LOINC, *code),
                "valueQuantity": {
                    "value": value,
                    "unit": "mm[Hg]",
                    "system": UCUM,
                    "code": "mm[Hg]",
                },
                "interpretation": [
                    {"coding": [{"system": INTERPRETATION, **flag}], "text": flag["display"]}
                ],
            }

        self.resources.append(
            {
                "resourceType": "Observation",
                "id": self.rid("bp"),
                "status": "final",
                "category": [_cc(OBS_CATEGORY, "vital-signs", "Vital Signs")],
                "code": _cc(LOINC, *BP_PANEL),
                "subject": self.ref,
                "effectiveDateTime": _dt(when, self.rng),
                "component": [
                    component(SYSTOLIC, systolic, 90, 139),
                    component(DIASTOLIC, diastolic, 60, 89),
                ],
            }
        )

    # ------------------------------------------------------------------ oncology

    def oncology(self, key: str, onset: date) -> None:
        rng = self.rng
        stage = rng.choices(STAGES, weights=(2, 2, 1.5, 1.5, 3))[0]
        self.resources.append(
            {
                "resourceType": "Observation",
                "id": self.rid("stage"),
                "status": "final",
                "category": [_cc(OBS_CATEGORY, "laboratory", "Laboratory")],
                "code": _cc(LOINC, *STAGE_GROUP),
                "subject": self.ref,
                "effectiveDateTime": _dt(onset, rng),
                "valueCodeableConcept": _cc(AJCC, stage, f"Stage {stage}"),
            }
        )
        positive: set[str] = set()
        tested = min(self.as_of, onset + timedelta(days=14))
        for marker, code, display, p in MARKERS[key]:
            hit = rng.random() < p
            if hit:
                positive.add(marker)
            if marker == "her2":
                answer = POSITIVE if hit else NEGATIVE
            else:
                answer = DETECTED if hit else NOT_DETECTED
            self.resources.append(
                {
                    "resourceType": "Observation",
                    "id": self.rid("marker"),
                    "status": "final",
                    "category": [_cc(OBS_CATEGORY, "laboratory", "Laboratory")],
                    "code": _cc(LOINC, code, display),
                    "subject": self.ref,
                    "effectiveDateTime": _dt(tested, rng),
                    "valueCodeableConcept": _cc(LOINC, *answer),
                }
            )
        start = self.day_between(tested, min(self.as_of, tested + timedelta(days=60)))
        if key == "nsclc" and "egfr" in positive and rng.random() < 0.85:
            self.medication(*OSIMERTINIB[1:], start)
        elif key == "nsclc" and stage in ("IIIB", "IV") and rng.random() < 0.6:
            self.medication(*PEMBROLIZUMAB[1:], start)

    # ------------------------------------------------------------------ procedures, devices

    def procedure(
        self,
        procedure: ProcedureDef,
        when: date,
        device: str | None = None,
        period: bool = False,
    ) -> str:
        rng = self.rng
        pid = self.rid("procedure")
        resource: Resource = {
            "resourceType": "Procedure",
            "id": pid,
            "status": "completed",
            "code": {
                "coding": [
                    {"system": OPCS4, "code": procedure.opcs, "display": procedure.display},
                    {"system": SNOMED, "code": procedure.snomed, "display": procedure.display},
                ],
                "text": procedure.display,
            },
            "subject": self.ref,
        }
        if period:
            hour = rng.randint(8, 15)
            resource["performedPeriod"] = {
                "start": f"{when.isoformat()}T{hour:02d}:00:00+00:00",
                "end": f"{when.isoformat()}T{hour + rng.randint(1, 2):02d}:30:00+00:00",
            }
        else:
            resource["performedDateTime"] = _dt(when, rng)
        resource["performer"] = [{"actor": _ref("Practitioner", self.site.consultant)}]
        if device:
            resource["focalDevice"] = [{"manipulated": _ref("Device", device)}]
        self.resources.append(resource)
        return pid

    def implant(self, device: DeviceClass) -> None:
        rng, config = self.rng, self.config
        manufacturer, model, catalogue_number = rng.choice(device.models)
        earliest = max(self.history_start, self.born + timedelta(days=365 * 50))
        implanted = self.day_between(earliest, self.as_of - timedelta(days=7))
        device_id = self.rid("device")
        lot = f"{model[:2].upper()}{implanted.year % 100:02d}{rng.randint(1000, 9999)}"
        serial = f"{rng.randint(10**8, 10**9 - 1)}"
        expiry = implanted + timedelta(days=rng.randint(200, 1500))
        gtin = _DEVICE_GTIN[model]
        self.resources.append(
            {
                "resourceType": "Device",
                "id": device_id,
                "udiCarrier": [
                    {
                        "deviceIdentifier": gtin,
                        "issuer": "http://hl7.org/fhir/NamingSystem/gs1-di",
                        "carrierHRF": f"(01){gtin}(17){expiry:%y%m%d}(10){lot}(21){serial}",
                    }
                ],
                "status": "active",
                "manufacturer": manufacturer,
                "expirationDate": expiry.isoformat(),
                "lotNumber": lot,
                "serialNumber": serial,
                "deviceName": [{"name": model, "type": "model-name"}],
                "modelNumber": model,
                "partNumber": catalogue_number,
                "type": _cc(SNOMED, device.snomed, device.display),
                "patient": self.ref,
            }
        )
        implant_id = self.procedure(device.implant, implanted, device_id, period=True)
        recorded = _dt(implanted, rng)
        self.resources.append(
            {
                "resourceType": "DeviceUseStatement",
                "id": self.rid("dus"),
                "status": "active",
                "subject": self.ref,
                "derivedFrom": [_ref("Procedure", implant_id)],
                "timingDateTime": recorded,
                "recordedOn": recorded,
                "device": _ref("Device", device_id),
            }
        )
        rate = device.outcome_rate
        faulty = config.faulty
        if model == faulty.model and implanted >= faulty.from_date:
            rate *= faulty.multiplier
        if rng.random() < rate:
            self.outcome(device, device_id, implanted)

    def outcome(self, device: DeviceClass, device_id: str, implanted: date) -> None:
        rng = self.rng
        kind = rng.choices(device.outcomes, [o.weight for o in device.outcomes])[0]
        noticed = self.day_between(
            implanted + timedelta(days=7), min(self.as_of, implanted + timedelta(days=3 * 365))
        )
        revised = rng.random() < 0.85
        revised_on = min(self.as_of, noticed + timedelta(days=rng.randint(3, 60)))
        condition_id = self.rid("complication")
        condition: Resource = {
            "resourceType": "Condition",
            "id": condition_id,
            "clinicalStatus": _cc(CONDITION_CLINICAL, "resolved", "Resolved")
            if revised
            else _cc(CONDITION_CLINICAL, "active", "Active"),
            "verificationStatus": _cc(CONDITION_VERIFICATION, "confirmed", "Confirmed"),
            "category": [_cc(CONDITION_CATEGORY, "encounter-diagnosis", "Encounter Diagnosis")],
            "code": _cc(ICD10, kind.icd10, kind.display),
            "subject": self.ref,
            "onsetDateTime": _dt(noticed, rng),
            "recordedDate": _dt(noticed, rng),
        }
        if revised:
            condition["abatementDateTime"] = _dt(revised_on, rng)
        self.resources.append(condition)
        if revised:
            self.procedure(device.revision, revised_on, device_id)
        if rng.random() < 0.9:
            self.resources.append(
                {
                    "resourceType": "AdverseEvent",
                    "id": self.rid("ae"),
                    "actuality": "actual",
                    "category": [_cc(AE_CATEGORY, "product-problem", "Product Problem")],
                    "event": _cc(ICD10, kind.icd10, kind.display),
                    "subject": self.ref,
                    "date": _dt(noticed, rng),
                    "recordedDate": _dt(noticed, rng),
                    "resultingCondition": [_ref("Condition", condition_id)],
                    "recorder": _ref("Practitioner", self.site.consultant),
                    "seriousness": _cc(AE_SERIOUSNESS, "serious", "Serious"),
                    "suspectEntity": [{"instance": _ref("Device", device_id)}],
                }
            )

    # ------------------------------------------------------------------ consent

    def opt_out(self) -> None:
        when = self.day_between(self.as_of - timedelta(days=1500), self.as_of - timedelta(days=1))
        self.resources.append(
            {
                "resourceType": "Consent",
                "id": self.rid("consent"),
                "status": "active",
                "scope": _cc(CONSENT_SCOPE, "research", "Research"),
                "category": [_cc(LOINC, "59284-0", "Patient Consent")],
                "patient": self.ref,
                "dateTime": _dt(when, self.rng),
                "policy": [{"authority": "https://digital.nhs.uk", "uri": NATIONAL_DATA_OPT_OUT}],
                "provision": {
                    "type": "deny",
                    "purpose": [
                        {"system": ACT_REASON, "code": "HRESCH", "display": "healthcare research"}
                    ],
                },
            }
        )


_CATEGORY_DISPLAY = {"laboratory": "Laboratory", "vital-signs": "Vital Signs"}
_DEVICE_GTIN = {model: _gtin(model) for d in DEVICE_CLASSES for _, model, _ in d.models}


def iter_patients(
    config: GeneratorConfig, start: int = 0, stop: int | None = None
) -> Iterator[list[Resource]]:
    """Each patient's resources, the Patient first, for indexes ``start`` to ``stop`` (default:
    ``config.patients``). References are ``<Type>/<id>``, to the patient's own resources or to
    :func:`iter_reference_resources`."""
    site_list = sites(config)
    for index in range(start, config.patients if stop is None else stop):
        yield _Patient(config, index, site_list).build()
