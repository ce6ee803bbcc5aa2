"""Property tests for ECL: random small hierarchies (many parents per concept, several roots),
random expressions written out as text, and a naive oracle that walks the graph.

* the parser and the numpy evaluation select exactly the concepts the oracle does;
* all three engines, given the compiled question, find exactly the patients whose condition
  codes the oracle selects.

The ``ci`` profile runs a small deterministic set; ``HYPOTHESIS_PROFILE=long`` forty times as
many, randomised.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feasibility.criteria import parse_question
from feasibility.engines.incremental import IncrementalEngine
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.engines.reference import ReferenceEngine
from feasibility.expansion import compile_question
from terminology import ecl
from terminology.expand import HierarchySource
from terminology.hierarchy import Hierarchy

from ..spec import feasibility_helpers as helpers

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
pytestmark = pytest.mark.timeout(0 if LONG else 300)
SNOMED = "http://snomed.info/sct"
AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
BASE = 100000
#: an id never in any drawn hierarchy
MISSING = 999999


def examples(n: int) -> Any:
    return settings(
        max_examples=n * 40 if LONG else n,
        derandomize=not LONG,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


Graph = dict[int, set[int]]  # concept -> parents


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    n = draw(st.integers(1, 18))
    parents: Graph = {}
    for i in range(n):
        node = BASE + i
        if i == 0 or draw(st.integers(0, 7)) == 0:  # a root (a concept with no parent)
            parents[node] = set()
            continue
        earlier = list(range(BASE, node))
        parents[node] = set(draw(st.lists(st.sampled_from(earlier), min_size=1, max_size=3)))
    return parents


def _words(draw: st.DrawFn, word: str) -> str:
    return draw(st.sampled_from([word, word.lower(), word.capitalize()]))


@st.composite
def expressions(draw: st.DrawFn, graph: Graph, depth: int = 3) -> tuple[Any, str]:
    """``(tree, text)``: a tree the oracle reads and the same expression as ECL text."""
    kind = draw(st.integers(0, 4 if depth > 0 else 1))
    ws = draw(st.sampled_from([" ", "  ", " /* c */ "]))
    if kind <= 1:
        if draw(st.integers(0, 12)) == 0:
            focus: Any = ("concept", None)
            text = "*"
        else:
            sctid = draw(st.sampled_from([*graph, MISSING]))
            focus = ("concept", sctid)
            text = str(sctid) + draw(st.sampled_from(["", " |a term|"]))
        if kind == 1:
            operator = draw(st.sampled_from(ecl.OPERATORS))
            return ("op", operator, focus), f"{operator}{draw(st.sampled_from(['', ' ']))}{text}"
        return focus, text
    if kind == 2:  # an operator over a parenthesised expression
        operator = draw(st.sampled_from(ecl.OPERATORS))
        inner, text = draw(expressions(graph, depth - 1))
        return ("op", operator, inner), f"{operator} ({text})"
    sub = [draw(expressions(graph, depth - 1)) for _ in range(draw(st.integers(2, 3)))]
    texts = [t if tree[0] in ("concept", "op") and "(" not in t else f"({t})" for tree, t in sub]
    if kind == 3:
        word = draw(st.sampled_from(["AND", "OR"]))
        joiner = "," if word == "AND" and draw(st.booleans()) else f"{ws}{_words(draw, word)}{ws}"
        return (word.lower(), [tree for tree, _ in sub]), joiner.join(texts)
    minus = f"{ws}{_words(draw, 'MINUS')}{ws}"
    return ("minus", sub[0][0], sub[1][0]), f"{texts[0]}{minus}{texts[1]}"


def oracle(tree: Any, graph: Graph) -> set[int]:
    """The concepts ``tree`` selects, by walking the graph one concept at a time."""
    children: Graph = {c: set() for c in graph}
    for c, ps in graph.items():
        for p in ps:
            children[p].add(c)

    def walk(start: int, edges: Graph) -> set[int]:
        out: set[int] = set()
        stack = list(edges[start])
        while stack:
            c = stack.pop()
            if c not in out:
                out.add(c)
                stack.extend(edges[c])
        return out

    def run(node: Any) -> set[int]:
        if node[0] == "concept":
            if node[1] is None:
                return set(graph)
            return {node[1]} if node[1] in graph else set()
        if node[0] == "op":
            seeds = run(node[2])
            down = node[1].startswith("<")
            edges = children if down else graph
            found: set[int] = set()
            for s in seeds:
                found |= set(edges[s]) if node[1].endswith("!") else walk(s, edges)
            if node[1] in ("<<", ">>", "<<!", ">>!"):
                found |= seeds
            return found
        if node[0] == "and":
            parts = [run(n) for n in node[1]]
            return set.intersection(*parts)
        if node[0] == "or":
            return set().union(*(run(n) for n in node[1]))
        return run(node[1]) - run(node[2])

    return run(tree)


def hierarchy_of(graph: Graph) -> Hierarchy:
    return Hierarchy.build(list(graph), [(c, p) for c, ps in graph.items() for p in ps])


@st.composite
def cases(draw: st.DrawFn) -> tuple[Graph, Any, str]:
    graph = draw(graphs())
    tree, text = draw(expressions(graph))
    return graph, tree, text


@examples(300)
@given(cases())
def test_expansion_equals_a_walk_of_the_graph(case: tuple[Graph, Any, str]) -> None:
    graph, tree, text = case
    hierarchy = hierarchy_of(graph)
    found = ecl.evaluate(ecl.parse(text), hierarchy)
    assert set(hierarchy.ids[found.index].tolist()) == oracle(tree, graph), text
    assert (MISSING in found.unknown) == (f"{MISSING}" in text)


ENGINES = (ReferenceEngine(), PolarsEngine(), IncrementalEngine())


@examples(60)
@given(cases(), st.data())
def test_engines_match_the_oracle_on_expanded_questions(
    case: tuple[Graph, Any, str], data: st.DataObject
) -> None:
    graph, tree, text = case
    selected = oracle(tree, graph)
    pool = [*graph, MISSING]
    drawn = {
        f"p{n}": data.draw(st.lists(st.sampled_from(pool), max_size=2))
        for n in range(data.draw(st.integers(1, 8)))
    }
    population = helpers.population(
        **{
            p: [helpers.patient(), *(helpers.condition(SNOMED, str(c)) for c in codes)]
            for p, codes in drawn.items()
        }
    )
    question = parse_question(
        {"inclusion": [{"type": "condition", "codes": [{"system": "snomed", "ecl": text}]}]}
    )
    compiled = compile_question(question, HierarchySource(hierarchy_of(graph))).question
    want = {p: any(c in selected for c in codes) for p, codes in drawn.items()}
    for engine in ENGINES:
        got = engine.evaluate(compiled, population, AT)
        assert {p: r.steps[0] is True for p, r in got.items()} == want, (engine.name, text)
