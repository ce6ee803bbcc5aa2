"""HDR UK Cohort Discovery compatibility: answering availability queries as Bunny does.

The Cohort Discovery task API hands out **availability queries** (RQuest JSON): a ``cohort`` of
``groups`` combined by ``groups_oper`` (``AND``/``OR``), each group a list of ``rules`` combined
by ``rules_oper``. A rule names a table (``varcat``: Person, Condition, Observation,
Measurement, Drug, Procedure), a ``type`` (``TEXT``: ``value`` is an OMOP concept id; ``NUM``: a
range ``min|max`` or ``min..max``, with ``varname`` ``AGE`` for age or ``OMOP=<concept id>``
for a measurement), and ``oper`` (``=`` include, ``!=`` exclude).

:func:`translate` turns one into our criteria (``docs/reference/criteria.md``), mapping concept
ids through the site's own OMOP vocabulary (:class:`ConceptMap`, Athena's ``CONCEPT.csv``).
Anything that cannot be translated faithfully is refused with its location in the query
(:class:`BunnyError`), never dropped. :func:`result` is the answer in the shape Bunny posts back;
its count is the node's *protected* total (a withheld total is posted as 0, which is what Bunny's
own low-number suppression posts). :class:`TaskPoller` fetches tasks from a task API and posts
the results back. The facts about the protocol come from the Bunny project's documentation and
models; no code of it is used.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from feasibility.criteria import CriteriaError, Question, parse_question

log = logging.getLogger(__name__)

#: OMOP vocabularies and the code systems of our criteria they become.
SYSTEMS = {
    "SNOMED": "snomed",
    "ICD10": "icd10",
    "ICD10CM": "icd10",
    "LOINC": "loinc",
    "dm+d": "dmd",
    "OPCS4": "opcs4",
}
#: Classifications whose codes stand for their descendants (``E11`` covers ``E11.9``).
PREFIX_SYSTEMS = {"icd10", "opcs4"}
#: OMOP's gender concepts' codes, as our ``sex`` criterion names them.
GENDER = {"M": "male", "F": "female"}
#: varcat -> the criterion type its concepts become.
CATEGORIES = {
    "Condition": "condition",
    "Observation": "observation",
    "Measurement": "observation",
    "Drug": "medication",
    "Procedure": "procedure",
}


class BunnyError(ValueError):
    """A query that cannot be translated faithfully: ``where`` is a JSON pointer into it."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{message} (at {where})")
        self.where = where


@dataclass(frozen=True)
class Concept:
    vocabulary: str
    code: str


class ConceptMap:
    """OMOP concept ids -> (vocabulary, code), from Athena's tab-separated ``CONCEPT.csv``."""

    def __init__(self, concepts: Mapping[int, Concept]) -> None:
        self.concepts = dict(concepts)

    @classmethod
    def from_athena(cls, path: Path) -> ConceptMap:
        csv.field_size_limit(sys.maxsize)  # concept names can be long
        concepts: dict[int, Concept] = {}
        with Path(path).open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = {"concept_id", "vocabulary_id", "concept_code"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not an Athena CONCEPT.csv (no {sorted(missing)})")
            for row in reader:
                concepts[int(row["concept_id"])] = Concept(
                    row["vocabulary_id"], row["concept_code"]
                )
        return cls(concepts)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {str(k): [c.vocabulary, c.code] for k, c in sorted(self.concepts.items())}
        path.write_text(json.dumps(data))

    @classmethod
    def open(cls, path: Path) -> ConceptMap:
        raw = json.loads(Path(path).read_text())
        return cls({int(k): Concept(v[0], v[1]) for k, v in raw.items()})

    def get(self, concept_id: str, where: str) -> Concept:
        try:
            found = self.concepts.get(int(concept_id))
        except ValueError:
            raise BunnyError(where, f"not an OMOP concept id: {concept_id!r}") from None
        if found is None:
            raise BunnyError(where, f"OMOP concept {concept_id} is not in this site's vocabulary")
        return found


def _range(value: str, where: str) -> tuple[float | None, float | None]:
    text = str(value)
    low, sep, high = text.partition("..") if ".." in text else text.partition("|")
    if not sep:
        raise BunnyError(where, f"a NUM rule's value is a range 'min|max', not {text!r}")

    def number(part: str) -> float | None:
        if part in ("", "null"):
            return None
        try:
            return float(part)
        except ValueError:
            raise BunnyError(where, f"not a number in the range: {part!r}") from None

    low_value, high_value = number(low), number(high)
    if low_value is None and high_value is None:
        raise BunnyError(where, "a range needs a lower or an upper bound")
    return low_value, high_value


def _codes(concept: Concept, where: str) -> list[dict[str, str]]:
    system = SYSTEMS.get(concept.vocabulary)
    if system is None:
        raise BunnyError(where, f"the vocabulary {concept.vocabulary} is not one criteria use")
    key = "prefix" if system in PREFIX_SYSTEMS else "code"
    return [{"system": system, key: concept.code}]


def _rule(rule: Mapping[str, Any], concepts: ConceptMap, where: str) -> dict[str, Any]:
    varcat = rule.get("varcat")
    kind = rule.get("type", "TEXT")
    oper = rule.get("oper", "=")
    varname = str(rule.get("varname", ""))
    if oper not in ("=", "!="):
        raise BunnyError(f"{where}/oper", f"unknown operator {oper!r}")
    if rule.get("time"):
        raise BunnyError(f"{where}/time", "time constraints are not translated")
    if rule.get("secondary_modifier"):
        raise BunnyError(f"{where}/secondary_modifier", "secondary modifiers are not translated")
    criterion: dict[str, Any]
    if varcat == "Person" and kind == "NUM" and varname.upper() == "AGE":
        low, high = _range(rule.get("value", ""), f"{where}/value")
        criterion = {"type": "age"}
        if low is not None:
            criterion["min"] = int(-(-low // 1))  # whole years, inclusive
        if high is not None:
            criterion["max"] = int(high // 1)
    elif varcat == "Person" and kind == "TEXT":
        concept = concepts.get(str(rule.get("value")), f"{where}/value")
        if concept.vocabulary != "Gender" or concept.code not in GENDER:
            raise BunnyError(f"{where}/value", "of a person, only sex (OMOP Gender) is translated")
        criterion = {"type": "sex", "values": [GENDER[concept.code]]}
    elif varcat == "Measurement" and kind == "NUM":
        _, sep, concept_id = varname.partition("=")
        if not sep:
            raise BunnyError(f"{where}/varname", "a measurement range names OMOP=<concept id>")
        concept = concepts.get(concept_id, f"{where}/varname")
        low, high = _range(rule.get("value", ""), f"{where}/value")
        test = {k: v for k, v in (("ge", low), ("le", high)) if v is not None}
        # RQuest carries no unit: the values are tested as recorded, as Bunny tests them
        criterion = {
            "type": "observation",
            "codes": _codes(concept, f"{where}/varname"),
            "value": test,
            "select": "any",
        }
    elif varcat in CATEGORIES and kind == "TEXT":
        concept = concepts.get(str(rule.get("value")), f"{where}/value")
        criterion = {"type": CATEGORIES[varcat], "codes": _codes(concept, f"{where}/value")}
    else:
        raise BunnyError(where, f"a {kind} rule on {varcat!r} is not translated")
    return {"type": "not", "criterion": criterion} if oper == "!=" else criterion


def _combined(parts: list[dict[str, Any]], oper: Any, where: str) -> dict[str, Any]:
    if oper not in ("AND", "OR"):
        raise BunnyError(where, f"unknown operator {oper!r} (AND or OR)")
    if len(parts) == 1:
        return parts[0]
    return {"type": "all_of" if oper == "AND" else "any_of", "criteria": parts}


def translate(task: Mapping[str, Any], concepts: ConceptMap) -> Question:
    """Our criteria for an availability query (:class:`BunnyError` if any part cannot be)."""
    cohort = task.get("cohort")
    if not isinstance(cohort, Mapping) or not isinstance(cohort.get("groups"), list):
        raise BunnyError("/cohort", "an availability query has cohort.groups")
    groups: list[dict[str, Any]] = []
    for i, group in enumerate(cohort["groups"]):
        where = f"/cohort/groups/{i}"
        rules = group.get("rules") if isinstance(group, Mapping) else None
        if not isinstance(rules, list) or not rules:
            raise BunnyError(f"{where}/rules", "a group has at least one rule")
        parts = [_rule(r, concepts, f"{where}/rules/{j}") for j, r in enumerate(rules)]
        groups.append(_combined(parts, group.get("rules_oper", "AND"), f"{where}/rules_oper"))
    if not groups:
        raise BunnyError("/cohort/groups", "a cohort has at least one group")
    oper = cohort.get("groups_oper", "AND")
    if oper == "AND":
        inclusion = [{"label": f"group {i + 1}", "any_of": [g]} for i, g in enumerate(groups)]
    else:
        inclusion = [
            {"label": "any group", "any_of": [_combined(groups, oper, "/cohort/groups_oper")]}
        ]
    try:
        return parse_question(
            {
                "schema": "concierge.criteria/1",
                "title": f"Cohort Discovery query {task.get('uuid', '')}".strip(),
                "inclusion": inclusion,
            }
        )
    except CriteriaError as exc:
        raise BunnyError("/cohort", str(exc)) from None


def result(
    task: Mapping[str, Any], total: Mapping[str, Any] | None, message: str = ""
) -> dict[str, Any]:
    """The answer in Bunny's shape. ``total``: the node's protected total cell; None for an
    error (``status: error`` with ``message``). A withheld total is posted as 0."""
    count = 0 if total is None or total["suppressed"] else int(total["value"])
    return {
        "uuid": task.get("uuid", ""),
        "status": "error" if total is None else "ok",
        "collection_id": task.get("collection", ""),
        "message": message,
        "protocolVersion": task.get("protocol_version", "v2"),
        "queryResult": {"count": count, "datasetCount": 1 if total is not None else 0, "files": []},
    }


#: Answers a translated question for the query's owner: the node's protected total cell.
Answerer = Callable[[Question, str], Mapping[str, Any]]


@dataclass
class TaskPoller:
    """Fetches availability queries from a Cohort Discovery task API and posts results back:
    ``GET {base}/task/nextjob/{collection}`` (200 a task, 204 none) and
    ``POST {base}/task/result/{uuid}/{collection}``, with HTTP basic authentication."""

    base_url: str
    collection: str
    concepts: ConceptMap
    answer: Answerer
    username: str = ""
    password: str = ""
    timeout_seconds: float = 10.0

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url.rstrip("/"),
            auth=(self.username, self.password),
            timeout=self.timeout_seconds,
        )

    def poll_once(self) -> dict[str, Any] | None:
        """Fetch one task, answer it, post the result; the result posted, or None when the
        task API had no task."""
        with self._client() as client:
            response = client.get(f"/task/nextjob/{self.collection}")
            if response.status_code == 204:
                return None
            response.raise_for_status()
            task: dict[str, Any] = response.json()
            try:
                question = translate(task, self.concepts)
                posted = result(task, self.answer(question, f"bunny/{task.get('owner', '')}"))
            except BunnyError as exc:
                posted = result(task, None, str(exc))
            except Exception as exc:  # refused (budget) or not current: said, never a count
                posted = result(task, None, f"not answered now: {type(exc).__name__}")
            done = client.post(
                f"/task/result/{task.get('uuid', '')}/{task.get('collection', self.collection)}",
                json=posted,
            )
            done.raise_for_status()
            log.info("cohort discovery task answered (%s)", posted["status"])
            return posted


__all__ = ["BunnyError", "ConceptMap", "TaskPoller", "result", "translate"]
