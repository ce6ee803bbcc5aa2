"""Attacks on federated answers: a small group split over three nodes, attacked with any
sequence of questions and node subsets, by one sponsor or colluding ones, and by a curious hub.

Three nodes, each its own population (own sites; regions shared by name, so the hub combines
regions across nodes), its own publication registry and policy. A group of 1-9 patients is
planted across the nodes (``1+2+3`` among other splits). Questions are drawn from a small set
that an attacker would use: a base question, the base minus the group (differencing), the group
alone, the base restricted to the group, another question; each is asked with a random subset
of the nodes, by a random one of two colluding sponsors. Each node protects its answer
(:func:`feasibility.disclosure.protection.protect`, exactly as for the hub's question), the
reply goes through :func:`federation.node.protected_reply` and the hub combines with
:func:`federation.combine.combine`.

The attacker sees every node's reply (the curious hub's view, more than the sponsor's) and every
combined answer, takes shown values as exact (``rounding=1``, the best case), knows every
relation from the cells' meaning (a node's funnel and site/region identities; a combined cell
is the sum of the nodes' parts), and even knows which cells are the same set of patients across
questions. The checker (the independent SVD solver of ``test_disclosure_attacks``) then says
what is determined: neither the group's size at the hub nor any node's small part may come out
as its true value, nor may any small cell of any answer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from pyroaring import BitMap

from feasibility.disclosure.answer import FUNNEL_FIELDS, Cell
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.disclosure.registry import PublicationRegistry
from federation.combine import combine, parse_reply
from federation.node import protected_reply
from tests.generative.test_disclosure_attacks import (
    Criterion,
    Relation,
    World,
    ask,
    attack,
    cells,
    known_relations,
    make_criterion,
    make_world,
    only,
    solve,
    truths,
    zero_unknowns,
)

NODES = ("north", "south", "west")
KINDS = ("base", "base minus group", "group", "base and group", "other")


def node_world(rng: random.Random, node: str, size: int) -> World:
    world = make_world(rng, size, rng.randint(1, 4), rng.randint(1, 3))
    return World(
        size,
        tuple(f"{node}.{s}" for s in world.site_of),
        {f"{node}.{s}": r for s, r in world.region_of.items()},
    )


def questions_at(rng: random.Random, world: World, group: BitMap) -> dict[str, list[Criterion]]:
    """Each kind of question as criteria over one node's population."""
    base = [make_criterion(rng, world, i, rng.uniform(0.5, 0.95), 0.0) for i in range(2)]
    other = [make_criterion(rng, world, 9, rng.uniform(0.3, 0.9), 0.03)]
    return {
        "base": base,
        "base minus group": [*base, only(group, world, "exclusion", "not the group")],
        "group": [only(group, world, "inclusion", "the group")],
        "base and group": [*base, only(group, world, "inclusion", "the group")],
        "other": other,
    }


def hub_cells(answer: Mapping[str, Any], prefix: str) -> dict[str, Cell]:
    def cell(c: Mapping[str, Any]) -> Cell:
        return Cell(c["value"], c["display"], c["suppressed"])

    out = {f"{prefix}total": cell(answer["total"])}
    out.update({f"{prefix}region:{r}": cell(c) for r, c in answer["by_region"].items()})
    out.update({f"{prefix}site:{s}": cell(c) for s, c in answer["by_site"].items()})
    for i, step in enumerate(answer["funnel"] or []):
        out.update({f"{prefix}funnel:{i}:{f}": cell(step[f]) for f in FUNNEL_FIELDS})
    return out


@st.composite
def splits(draw: st.DrawFn) -> tuple[int, int, int]:
    if draw(st.booleans()):
        return (1, 2, 3)
    parts = draw(st.tuples(*[st.integers(0, 4)] * 3).filter(lambda p: 1 <= sum(p) <= 9))
    return parts  # type: ignore[no-any-return]


@attack(25)
@given(
    seed=st.integers(0, 2**32 - 1),
    split=splits(),
    threshold=st.sampled_from([10, 10, 5]),
    suppress_zero=st.booleans(),
    sequence=st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.sets(st.sampled_from(NODES), min_size=1),
            st.sampled_from(["Acme", "Rival"]),
        ),
        min_size=2,
        max_size=6,
    ),
)
def test_a_split_group_is_never_derived(
    seed: int,
    split: tuple[int, int, int],
    threshold: int,
    suppress_zero: bool,
    sequence: Sequence[tuple[str, set[str], str]],
) -> None:
    rng = random.Random(seed)
    policy = DisclosurePolicy(threshold, 1, suppress_zero, True)
    worlds = {n: node_world(rng, n, rng.randint(40, 160)) for n in NODES}
    groups = {n: BitMap(range(k)) for n, k in zip(NODES, split, strict=True)}
    criteria = {n: questions_at(rng, worlds[n], groups[n]) for n in NODES}
    registries = {n: PublicationRegistry("sqlite://") for n in NODES}

    published: dict[str, Cell] = {}
    sets: dict[str, BitMap] = {}
    relations: list[Relation] = []
    by_node_seen: dict[tuple[str, str, str], Any] = {}
    for q, (kind, subset, org) in enumerate(sequence):
        answers = []
        for n in sorted(subset):
            exact = ask(worlds[n], criteria[n][kind])
            protected, _ = protect(exact, policy, registries[n], f"hub/{org}", kind)
            reply = protected_reply(n, {**protected.to_dict(), "question": kind})
            answers.append(parse_reply(n, reply))
            p = f"{q}:{n}:"
            published.update(cells(protected, p))
            sets.update(truths(exact, p))
            relations += known_relations(worlds[n], criteria[n][kind], p)
            # a node's answer does not depend on the other nodes asked
            key = (n, kind, org)
            if key in by_node_seen and not by_node_seen[key][1]:
                assert reply["total"] == by_node_seen[key][0]
            by_node_seen[key] = (reply["total"], False)
        combined = combine(sorted(subset), answers, [])
        hub = hub_cells(combined, f"{q}:hub:")
        published.update(hub)
        # what the attacker knows of a combined cell: the sum of the nodes' parts
        for name in hub:
            local = name.removeprefix(f"{q}:hub:")
            parts = [f"{q}:{n}:{local}" for n in sorted(subset) if f"{q}:{n}:{local}" in sets]
            relations.append((name, parts))
            sets[name] = BitMap()
            sizes_sum = sum(len(sets[part]) for part in parts)
            sets[name] = BitMap(range(sizes_sum))  # only its size is used
            # a combined cell is shown only when every part is, and then it is their sum
            if not hub[name].suppressed:
                assert all(not published[part].suppressed for part in parts)
                assert hub[name].value == sum(published[part].value or 0 for part in parts)

    # the target: each node's part of the group and their sum, never published as such
    for n in NODES:
        published[f"G:{n}"] = Cell(None, "withheld", True)
        sets[f"G:{n}"] = groups[n]
    published["G"] = Cell(None, "withheld", True)
    sets["G"] = BitMap(range(sum(split)))
    relations.append(("G", [f"G:{n}" for n in NODES]))
    # the attacker even knows which cells of one node are the same patients
    by_set: dict[tuple[str, bytes], list[str]] = {}
    for name, bits in sets.items():
        if name == "G" or ":hub:" in name:
            continue
        node = name.split(":")[1] if not name.startswith("G:") else name[2:]
        by_set.setdefault((node, bits.serialize()), []).append(name)
    for names in by_set.values():
        relations += [(names[0], [other]) for other in names[1:]]

    sizes = {k: len(v) for k, v in sets.items()}
    derived = solve(published, relations, zero_unknowns(sizes))
    if "G" in derived.determined:
        event("the group's total is pinned (to a wrong value)")
    for name, value in derived.determined.items():
        true = sizes[name]
        if name == "G" or name.startswith("G:"):
            assert round(value) != true or true == 0, (name, value, true)
        elif 1 <= true < threshold:
            assert round(value) != true, (name, value, true)
