"""OHDSI cohort definitions (the Circe JSON that ATLAS exports) as our criteria.

A Circe definition selects *cohort entries*: initial events (``PrimaryCriteria``) from concept
sets, qualified by ``AdditionalCriteria`` and ``InclusionRules`` (groups of correlated criteria
with windows relative to the entry, occurrence counts, demographics), and an exit
(``EndStrategy``, ``CensoringCriteria``). A feasibility question asks who qualifies *at an
index instant*. The translation:

* each concept set becomes code entries: SNOMED CT (and dm+d) items one ECL expression
  (``includeDescendants``: ``<<``; ``isExcluded``: ``MINUS``), ICD-10 and OPCS-4 items codes
  (``includeDescendants``: a prefix), LOINC and UCUM items codes;
* the initial events become the first inclusion step, the criterion every window is anchored
  on (``"anchor": "index_event"``: its earliest event, which is Circe's ``First`` limit);
  ``AdditionalCriteria`` and each inclusion rule become one step each (a funnel line);
* a correlated criterion becomes a condition, measurement (observation with ``select: any``),
  drug exposure (medication), procedure or observation criterion with its ``StartWindow`` in
  days around the entry, and its ``Occurrence`` as ``min_count`` (at least), ``not`` (exactly or
  at most 0) or both (exactly n);
* ``Gender`` becomes a sex criterion; ``Age`` an age criterion **at the index date**, not at
  cohort entry.

What does not translate exactly is listed in :class:`AtlasReport` (``issues``), each with
whether it changes who is counted. The import refuses (:class:`AtlasImportError`) while any
issue changes the meaning, unless the caller accepts that kind of issue by name (``accept``):
observation-period logic (``observation_window``), era collapsing (``collapse``), custom end
strategies and censoring (``exit``), age at the index date (``age_at_index``), and anything
untranslatable is refused outright. Nothing is guessed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .criteria import CriteriaError, Question, parse_question

#: Issue kinds a caller may accept by name, and what accepting means.
ACCEPTABLE = {
    "observation_window": "ignore required observation before/after the entry event",
    "collapse": "ignore era collapsing of cohort episodes",
    "exit": "ignore custom end strategies and censoring: members stay in until the index date",
    "age_at_index": "test ages at the index date instead of at cohort entry",
    "unit_conversion": "convert measurements in other units instead of leaving them out",
}

#: OMOP vocabulary id -> our system alias
VOCABULARIES = {
    "SNOMED": "snomed",
    "dm+d": "dmd",
    "DM+D": "dmd",
    "ICD10": "icd10",
    "ICD10CM": "icd10",
    "OPCS4": "opcs4",
    "LOINC": "loinc",
}
#: Circe operators of a NumericRange -> our value test bounds
OPS = {"lt": "lt", "lte": "le", "gt": "gt", "gte": "ge", "eq": "eq"}
GENDERS = {"8507": "male", "8532": "female", "M": "male", "F": "female"}
DOMAINS = {
    "ConditionOccurrence": "condition",
    "Measurement": "observation",
    "Observation": "observation",
    "DrugExposure": "medication",
    "ProcedureOccurrence": "procedure",
}
#: Fields of a domain criterion we translate (any other that is set is refused)
HANDLED = {
    "CodesetId",
    "First",
    "Gender",
    "Age",
    "ValueAsNumber",
    "Unit",
    "ValueAsConcept",
    "CorrelatedCriteria",
}
ANCHOR = "index_event"


@dataclass
class Issue:
    path: str
    what: str
    kind: str  # an ACCEPTABLE key, or "untranslatable"
    changes_meaning: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "what": self.what,
            "kind": self.kind,
            "changes_meaning": self.changes_meaning,
        }


@dataclass
class AtlasReport:
    issues: list[Issue] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    concept_sets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, path: str, what: str, kind: str, changes_meaning: bool = True) -> None:
        self.issues.append(Issue(path, what, kind, changes_meaning))

    @property
    def refusals(self) -> list[Issue]:
        return [
            i
            for i in self.issues
            if i.changes_meaning and (i.kind == "untranslatable" or i.kind not in self.accepted)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "issues": [i.to_dict() for i in self.issues],
            "accepted": self.accepted,
            "refused": bool(self.refusals),
            "concept_sets": self.concept_sets,
        }


class AtlasImportError(ValueError):
    """The definition cannot be imported without changing its meaning (``report`` says why)."""

    def __init__(self, report: AtlasReport) -> None:
        self.report = report
        lines = [
            f"  {i.path}: {i.what}" + (f" (accept with {i.kind})" if i.kind in ACCEPTABLE else "")
            for i in report.refusals
        ]
        super().__init__("the cohort definition does not translate exactly:\n" + "\n".join(lines))


@dataclass
class Imported:
    question: Question
    report: AtlasReport
    criteria: dict[str, Any]


def _expression(document: Any) -> dict[str, Any]:
    """The Circe expression: the document itself, or a WebAPI cohort definition around it
    (``expression``, an object or a JSON string)."""
    if not isinstance(document, dict):
        raise ValueError("an ATLAS cohort definition is a JSON object")
    inner = document.get("expression")
    if isinstance(inner, str):
        inner = json.loads(inner)
    if isinstance(inner, dict):
        return inner
    if "PrimaryCriteria" in document:
        return document
    raise ValueError("no PrimaryCriteria: is this an ATLAS / Circe cohort definition?")


class _Translator:
    def __init__(self, expression: dict[str, Any], report: AtlasReport) -> None:
        self.expression = expression
        self.report = report
        self.sets: dict[int, list[dict[str, Any]]] = {}
        self.primary_limit = "First"

    # ---------------------------------------------------------------- concept sets

    def concept_sets(self) -> None:
        for n, concept_set in enumerate(self.expression.get("ConceptSets") or ()):
            path = f"/ConceptSets/{n}"
            items = (concept_set.get("expression") or {}).get("items") or []
            snomed_in: list[str] = []
            snomed_out: list[str] = []
            entries: list[dict[str, Any]] = []
            for k, item in enumerate(items):
                where = f"{path}/expression/items/{k}"
                concept = item.get("concept") or {}
                vocabulary = str(concept.get("VOCABULARY_ID") or "")
                code = str(concept.get("CONCEPT_CODE") or "").strip()
                system = VOCABULARIES.get(vocabulary)
                descendants = bool(item.get("includeDescendants"))
                excluded = bool(item.get("isExcluded"))
                if item.get("includeMapped"):
                    self.report.add(
                        where,
                        "includeMapped (non-standard concepts mapped to this "
                        "one) needs the OMOP vocabulary",
                        "untranslatable",
                    )
                if not code:
                    self.report.add(
                        where,
                        "no CONCEPT_CODE: OMOP concept ids alone cannot be resolved here",
                        "untranslatable",
                    )
                    continue
                if system is None:
                    self.report.add(
                        where,
                        f"vocabulary {vocabulary or '?'} ({code}) has no "
                        "match in this product's code systems",
                        "untranslatable",
                    )
                    continue
                if system in ("snomed", "dmd"):
                    if not code.isdigit():
                        self.report.add(where, f"{code} is not a SNOMED CT id", "untranslatable")
                        continue
                    (snomed_out if excluded else snomed_in).append(
                        f"<< {code}" if descendants else code
                    )
                    continue
                if excluded:
                    self.report.add(
                        where,
                        f"an excluded {vocabulary} code ({code}) cannot be "
                        "taken out of a code list here",
                        "untranslatable",
                    )
                    continue
                if descendants and system in ("icd10", "opcs4"):
                    # in these classifications a code's descendants are the codes under it
                    entries.append({"system": system, "prefix": code})
                elif descendants:
                    self.report.add(
                        where,
                        f"includeDescendants on {vocabulary} {code}: its "
                        "descendants in the OMOP vocabulary are not known here",
                        "untranslatable",
                    )
                else:
                    entries.append({"system": system, "code": code})
            if snomed_in:
                ecl = " OR ".join(snomed_in)
                if snomed_out:
                    right = " OR ".join(snomed_out)
                    left = f"({ecl})" if len(snomed_in) > 1 else ecl
                    ecl = f"{left} MINUS " + (f"({right})" if len(snomed_out) > 1 else right)
                entries.insert(0, {"system": "snomed", "ecl": ecl})
            self.sets[int(concept_set.get("id", n))] = entries
            self.report.concept_sets[str(concept_set.get("name") or concept_set.get("id"))] = (
                entries
            )

    # ---------------------------------------------------------------- criteria

    def domain(
        self, criterion: dict[str, Any], path: str, correlated: bool
    ) -> dict[str, Any] | None:
        if len(criterion) != 1:
            self.report.add(path, "a criterion names one domain", "untranslatable")
            return None
        ((name, body),) = criterion.items()
        kind = DOMAINS.get(name)
        where = f"{path}/{name}"
        if kind is None:
            self.report.add(
                where, f"{name} criteria do not translate (no such data here)", "untranslatable"
            )
            return None
        body = body or {}
        for key, value in body.items():
            if key not in HANDLED and value not in (None, [], False, {}):
                self.report.add(f"{where}/{key}", f"{key} is not translated", "untranslatable")
        codes = self.sets.get(int(body["CodesetId"])) if body.get("CodesetId") is not None else None
        if not codes:
            self.report.add(
                f"{where}/CodesetId", "no concept set (or an empty one)", "untranslatable"
            )
            return None
        out: dict[str, Any] = {"type": kind, "codes": codes}
        if body.get("First") and correlated:
            # (in the initial events the anchor is the earliest event already)
            self.report.add(
                f"{where}/First",
                "'first occurrence' of a correlated criterion is not translated",
                "untranslatable",
            )
        if name == "Measurement" or name == "Observation":
            value = body.get("ValueAsNumber")
            units = body.get("Unit") or []
            if value:
                test = self.numeric(value, f"{where}/ValueAsNumber")
                if test is None:
                    return None
                if units:
                    unit = str((units[0] or {}).get("CONCEPT_CODE") or "")
                    test["unit"] = unit
                    self.report.add(
                        f"{where}/Unit",
                        f"results in other units than {unit} are "
                        "converted and tested, where Circe leaves them out",
                        "unit_conversion",
                    )
                    if len(units) > 1:
                        self.report.add(
                            f"{where}/Unit", "several units: tested in the first", "untranslatable"
                        )
                out["value"] = test
                out["select"] = "any"
            elif units:
                self.report.add(
                    f"{where}/Unit", "a unit without a value is not translated", "untranslatable"
                )
            answers = body.get("ValueAsConcept") or []
            if answers:
                value_codes = []
                for answer in answers:
                    system = VOCABULARIES.get(str(answer.get("VOCABULARY_ID") or ""))
                    if system is None or not answer.get("CONCEPT_CODE"):
                        self.report.add(
                            f"{where}/ValueAsConcept",
                            "an answer concept with no code in a known vocabulary",
                            "untranslatable",
                        )
                        return None
                    value_codes.append({"system": system, "code": str(answer["CONCEPT_CODE"])})
                out["value_codes"] = value_codes
                out["select"] = "any"
        extra: list[dict[str, Any]] = []
        if body.get("Gender"):
            sex = self.gender(body["Gender"], f"{where}/Gender")
            if sex:
                extra.append(sex)
        if body.get("Age"):
            age = self.age(body["Age"], f"{where}/Age")
            if age:
                extra.append(age)
        if body.get("CorrelatedCriteria"):
            self.report.add(
                f"{where}/CorrelatedCriteria",
                "criteria nested in a criterion are not translated",
                "untranslatable",
            )
        if extra:
            return {"type": "all_of", "criteria": [out, *extra], "_event": out}
        return out

    def numeric(self, value: dict[str, Any], path: str) -> dict[str, Any] | None:
        op = str(value.get("Op") or "")
        number = value.get("Value")
        if op in OPS and number is not None:
            return {OPS[op]: number}
        if op == "bt" and number is not None and value.get("Extent") is not None:
            return {"ge": number, "le": value["Extent"]}
        self.report.add(path, f"the numeric range {op!r} is not translated", "untranslatable")
        return None

    def gender(self, concepts: Iterable[dict[str, Any]], path: str) -> dict[str, Any] | None:
        values = []
        for concept in concepts:
            key = str(concept.get("CONCEPT_CODE") or concept.get("CONCEPT_ID") or "")
            if key not in GENDERS:
                self.report.add(path, f"gender {key!r} is not known", "untranslatable")
                return None
            values.append(GENDERS[key])
        return {"type": "sex", "values": sorted(set(values))}

    def age(self, value: dict[str, Any], path: str) -> dict[str, Any] | None:
        test = self.numeric(value, path)
        if test is None:
            return None
        bounds: dict[str, int] = {}
        for key, number in test.items():
            n = int(number)
            if key in ("ge", "eq"):
                bounds["min"] = n
            if key in ("le", "eq"):
                bounds["max"] = n
            if key == "gt":
                bounds["min"] = n + 1
            if key == "lt":
                bounds["max"] = n - 1
        self.report.add(
            path, "age is tested at the index date, Circe tests it at cohort entry", "age_at_index"
        )
        return {"type": "age", **bounds}

    def windowed(self, correlated: dict[str, Any], path: str) -> dict[str, Any] | None:
        criterion = self.domain(correlated.get("Criteria") or {}, f"{path}/Criteria", True)
        if criterion is None:
            return None
        event = criterion.pop("_event", criterion)
        window = correlated.get("StartWindow")
        if window:
            if window.get("UseIndexEnd") or window.get("UseEventEnd"):
                self.report.add(
                    f"{path}/StartWindow",
                    "windows on end dates are not translated (records have no end here)",
                    "untranslatable",
                )
            start, end = (self.endpoint(window.get(k)) for k in ("Start", "End"))
            event["window"] = {"start": start, "end": end, "anchor": ANCHOR}
            if self.primary_limit != "First":
                self.report.add(
                    "/PrimaryCriteria/PrimaryCriteriaLimit",
                    "windows relative to "
                    f"every entry ({self.primary_limit}) are not translated; the "
                    "earliest entry anchors them",
                    "untranslatable",
                )
                self.primary_limit = "First"  # reported once
        if correlated.get("EndWindow"):
            self.report.add(
                f"{path}/EndWindow", "end-date windows are not translated", "untranslatable"
            )
        if correlated.get("RestrictVisit"):
            self.report.add(
                f"{path}/RestrictVisit", "visits are not in this data", "untranslatable"
            )
        occurrence = correlated.get("Occurrence") or {"Type": 2, "Count": 1}
        kind, count = int(occurrence.get("Type", 2)), int(occurrence.get("Count", 1))
        if occurrence.get("IsDistinct"):
            self.report.add(
                f"{path}/Occurrence/IsDistinct",
                "distinct counting is not translated",
                "untranslatable",
            )
        if kind == 2:  # at least
            if count <= 0:
                self.report.add(
                    f"{path}/Occurrence",
                    "at least 0: always true, left out",
                    "untranslatable",
                    changes_meaning=False,
                )
                return None
            event["min_count"] = count
            return criterion
        if count == 0:  # exactly 0 or at most 0
            return {"type": "not", "criterion": criterion}
        if kind == 1:  # at most n
            more = json.loads(json.dumps(event))
            more["min_count"] = count + 1
            return {"type": "not", "criterion": more}
        at_least = json.loads(json.dumps(criterion))
        at_least_event = at_least if at_least["type"] != "all_of" else at_least["criteria"][0]
        at_least_event["min_count"] = count
        more = json.loads(json.dumps(event))
        more["min_count"] = count + 1
        return {"type": "all_of", "criteria": [at_least, {"type": "not", "criterion": more}]}

    @staticmethod
    def endpoint(point: dict[str, Any] | None) -> int | None:
        if not point or point.get("Days") is None:
            return None
        unit = str(point.get("TimeUnit") or "day")
        days = (
            int(point.get("TimeUnitValue") or point["Days"])
            if unit != "day"
            else int(point["Days"])
        )
        return days * int(point.get("Coeff", 1) or 1)

    def group(self, group: dict[str, Any], path: str) -> dict[str, Any] | None:
        parts: list[dict[str, Any]] = []
        for n, correlated in enumerate(group.get("CriteriaList") or ()):
            found = self.windowed(correlated, f"{path}/CriteriaList/{n}")
            if found is not None:
                parts.append(found)
        for n, demographic in enumerate(group.get("DemographicCriteriaList") or ()):
            where = f"{path}/DemographicCriteriaList/{n}"
            for key, value in demographic.items():
                if key == "Age" and value:
                    found = self.age(value, f"{where}/Age")
                elif key == "Gender" and value:
                    found = self.gender(value, f"{where}/Gender")
                elif value in (None, [], {}, False):
                    continue
                else:
                    self.report.add(f"{where}/{key}", f"{key} is not translated", "untranslatable")
                    continue
                if found is not None:
                    parts.append(found)
        for n, inner in enumerate(group.get("Groups") or ()):
            found = self.group(inner, f"{path}/Groups/{n}")
            if found is not None:
                parts.append(found)
        if not parts:
            return None
        kind = str(group.get("Type") or "ALL")
        count = int(group.get("Count") or 0)
        if kind == "ALL" or (kind == "AT_LEAST" and count == len(parts)):
            return parts[0] if len(parts) == 1 else {"type": "all_of", "criteria": parts}
        if kind == "ANY" or (kind == "AT_LEAST" and count == 1):
            return parts[0] if len(parts) == 1 else {"type": "any_of", "criteria": parts}
        if kind == "AT_MOST" and count == 0:
            inner = parts[0] if len(parts) == 1 else {"type": "any_of", "criteria": parts}
            return {"type": "not", "criterion": inner}
        self.report.add(
            path,
            f"a group of type {kind} {count} of {len(parts)} is not translated",
            "untranslatable",
        )
        return None

    # ---------------------------------------------------------------- the whole

    def question(self, title: str | None) -> dict[str, Any]:
        e = self.expression
        self.concept_sets()
        primary = e.get("PrimaryCriteria") or {}
        window = primary.get("ObservationWindow") or {}
        for key in ("PriorDays", "PostDays"):
            if int(window.get(key) or 0) > 0:
                self.report.add(
                    f"/PrimaryCriteria/ObservationWindow/{key}",
                    f"{window[key]} days of continuous observation "
                    f"{'before' if key == 'PriorDays' else 'after'} the entry: this "
                    "data has no observation periods",
                    "observation_window",
                )
        self.primary_limit = str((primary.get("PrimaryCriteriaLimit") or {}).get("Type") or "First")
        translated = []
        for n, criterion in enumerate(primary.get("CriteriaList") or ()):
            found = self.domain(criterion, f"/PrimaryCriteria/CriteriaList/{n}", False)
            if found is not None:
                translated.append((found, found.pop("_event", found)))
        if not translated:
            raise ValueError("no initial event translates: nothing to anchor the cohort on")
        if len(translated) == 1:
            whole, anchor = translated[0]
            extras = whole["criteria"][1:] if whole is not anchor else []
        else:
            # several initial events: one anchor over all their codes, when that is the same
            if len({event["type"] for _, event in translated}) > 1 or any(
                whole is not event or set(event) != {"type", "codes"} for whole, event in translated
            ):
                self.report.add(
                    "/PrimaryCriteria/CriteriaList",
                    "several initial events of different domains or with filters",
                    "untranslatable",
                )
            anchor = {
                "type": translated[0][1]["type"],
                "codes": [c for _, event in translated for c in event["codes"]],
            }
            extras = []
        anchor["id"] = ANCHOR
        anchor["label"] = "initial event"
        first_step = [anchor, *extras]
        inclusion: list[dict[str, Any]] = [
            {
                "label": "initial event",
                "any_of": [{"type": "all_of", "criteria": first_step}]
                if len(first_step) > 1
                else first_step,
            }
        ]
        if e.get("AdditionalCriteria"):
            found = self.group(e["AdditionalCriteria"], "/AdditionalCriteria")
            if found is not None:
                inclusion.append({"label": "additional criteria", "any_of": [found]})
        for n, rule in enumerate(e.get("InclusionRules") or ()):
            found = self.group(rule.get("expression") or {}, f"/InclusionRules/{n}/expression")
            if found is not None:
                inclusion.append({"label": rule.get("name") or f"rule {n + 1}", "any_of": [found]})
        end = e.get("EndStrategy")
        if end:
            self.report.add(
                "/EndStrategy",
                "a custom end strategy "
                f"({', '.join(end)}): members here stay in while they qualify",
                "exit",
            )
        if e.get("CensoringCriteria"):
            self.report.add(
                "/CensoringCriteria",
                "censoring events end cohort membership in Circe; they are not translated",
                "exit",
            )
        censor = e.get("CensorWindow") or {}
        if censor.get("StartDate") or censor.get("EndDate"):
            self.report.add("/CensorWindow", "a censor window is not translated", "exit")
        collapse = e.get("CollapseSettings") or {}
        if int(collapse.get("EraPad") or 0) > 0:
            self.report.add(
                "/CollapseSettings/EraPad",
                f"episodes {collapse['EraPad']} days apart are merged into one era in Circe",
                "collapse",
                changes_meaning=bool(end),
            )
        self.report.add(
            "/",
            "cohort exit at the end of observation: read as still in the "
            "population (alive, records live) at the index date",
            "observation_window",
            changes_meaning=False,
        )
        return {
            "schema": "concierge.criteria/1",
            "title": title or e.get("Title") or "Imported from ATLAS",
            "inclusion": inclusion,
        }


def import_atlas(document: Any, accept: Iterable[str] = (), title: str | None = None) -> Imported:
    """Our criteria for an ATLAS / Circe cohort definition; :class:`AtlasImportError` (with
    the report) when a part that changes the meaning does not translate and is not accepted;
    ``ValueError`` when the document is not a cohort definition at all."""
    accepted = list(dict.fromkeys(accept))
    unknown = [a for a in accepted if a not in ACCEPTABLE]
    if unknown:
        raise ValueError(f"unknown accept {unknown}; one of {', '.join(ACCEPTABLE)}")
    report = AtlasReport(accepted=accepted)
    name = document.get("name") if isinstance(document, dict) else None
    criteria = _Translator(_expression(document), report).question(title or name)
    if report.refusals:
        raise AtlasImportError(report)
    try:
        question = parse_question(criteria)
    except CriteriaError as exc:
        report.add("/", f"the translation is not valid criteria: {exc}", "untranslatable")
        raise AtlasImportError(report) from None
    return Imported(question, report, criteria)


__all__ = ["ACCEPTABLE", "AtlasImportError", "AtlasReport", "Imported", "import_atlas"]
