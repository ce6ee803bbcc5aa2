"""Device problems in clinical notes: a rule-based clinical NLP pipeline (medspaCy).

The pipeline is spaCy's blank English tokenizer and rule sentencizer, medspaCy's target matcher with
the rules in ``note_rules/device_problems.json`` (device problems such as loosening, dislocation,
revision, infection, lead fracture and pump failure, and device mentions), and medspaCy's ConText
with its own shipped rules (and the few in the rule file), which marks each mention negated ("no
evidence of"), uncertain ("possible"), historical ("history of"), hypothetical ("if ... returns") or
about the family ("mother had"). Nothing is downloaded: there is no statistical model, only rules.

A problem counts as a finding when a device is mentioned within :data:`DEVICE_WINDOW` tokens of it
in the same sentence, or when its phrase names the device itself (``names_device`` in the rule's
metadata: "lead fracture", "pump failure"); a finding is *asserted* (a candidate outcome) when
ConText marked it none of negated, uncertain, historical, hypothetical or family. The spans are
character offsets in the text given, so with the resource's version they say exactly what was read.

Why rules and not a model: the issue asks for an auditable, deterministic pipeline a regulator can
re-run; each rule is a line in the JSON file and has a spec test
(``tests/spec/test_note_rules_spec.py``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

#: Tokens between a problem and a device mention for the problem to be about a device.
DEVICE_WINDOW = 12
#: Category of the device mentions in the rule file.
DEVICE = "DEVICE"
#: File of the shipped rule set (in this package).
RULES = "device_problems.json"


@dataclass(frozen=True)
class NoteFinding:
    """A device problem mentioned near a device in a note."""

    #: the rule's category (``LOOSENING``, ``INFECTION`` ...)
    problem: str
    #: outcome codes the problem stands for, as ``system|code``
    codes: tuple[str, ...]
    #: character span of the problem in the text, ``[start, end)``
    start: int
    end: int
    #: character span of the nearest device mention
    device_start: int
    device_end: int
    negated: bool = False
    uncertain: bool = False
    historical: bool = False
    hypothetical: bool = False
    family: bool = False

    @property
    def asserted(self) -> bool:
        """A candidate outcome: ConText found no modifier that takes the mention away."""
        return not (
            self.negated or self.uncertain or self.historical or self.hypothetical or self.family
        )


def rule_set() -> dict[str, Any]:
    """The shipped rules as a document (``target_rules``: medspaCy's TargetRule dictionaries)."""
    text = resources.files("fhir_adapters.note_rules").joinpath(RULES).read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@functools.cache
def _pipeline() -> Any:
    # imported here: spaCy and medspaCy take seconds to import, and only note readers need them
    import medspacy  # noqa: F401  (registers the medspacy_* pipeline factories)
    import spacy
    from loguru import logger
    from medspacy.context import ConTextRule
    from medspacy.target_matcher import TargetRule

    # PyRuSH (imported by medspacy) logs each sentence's tokens at DEBUG: note text must never
    # reach a log, so its logger is switched off (this pipeline uses spaCy's sentencizer anyway)
    logger.disable("PyRuSH")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    matcher: Any = nlp.add_pipe("medspacy_target_matcher")
    rules = rule_set()
    matcher.add([TargetRule.from_dict(rule) for rule in rules["target_rules"]])
    context: Any = nlp.add_pipe("medspacy_context")
    context.add([ConTextRule.from_dict(rule) for rule in rules.get("context_rules", ())])
    return nlp


def find_device_problems(text: str) -> tuple[NoteFinding, ...]:
    """Every device problem mentioned near a device in ``text``, in text order, with ConText's
    marks (:attr:`NoteFinding.asserted` tells the candidate outcomes)."""
    if not text.strip():
        return ()
    doc = _pipeline()(text)
    found = []
    for sentence in doc.sents:
        mentions = [e for e in doc.ents if e.sent.start == sentence.start]
        devices = [e for e in mentions if e.label_ == DEVICE]
        for problem in mentions:
            if problem.label_ == DEVICE:
                continue
            near = [
                d
                for d in devices
                if max(d.start - problem.end, problem.start - d.end, 0) <= DEVICE_WINDOW
            ]
            metadata = problem._.target_rule.metadata or {}
            if metadata.get("names_device"):
                device = problem  # "lead fracture", "pump failure": the phrase names its device
            elif near:
                device = min(near, key=lambda d: max(d.start - problem.end, problem.start - d.end))
            else:
                continue
            codes = tuple(metadata.get("codes", ()))
            found.append(
                NoteFinding(
                    problem=problem.label_,
                    codes=codes,
                    start=problem.start_char,
                    end=problem.end_char,
                    device_start=device.start_char,
                    device_end=device.end_char,
                    negated=bool(problem._.is_negated),
                    uncertain=bool(problem._.is_uncertain),
                    historical=bool(problem._.is_historical),
                    hypothetical=bool(problem._.is_hypothetical),
                    family=bool(problem._.is_family),
                )
            )
    return tuple(found)


__all__ = ["DEVICE_WINDOW", "NoteFinding", "find_device_problems", "rule_set"]
