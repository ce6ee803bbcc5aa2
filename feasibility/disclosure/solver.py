"""The solver behind :func:`~feasibility.disclosure.protection.protect`: every published cell of an
answer (and the implied cells a reader can work out), the relations between them, and the fixed
point that decides which cells are shown and which withheld (rules 1 to 5), with the exact
linear-algebra audit. See ``docs/explanation/disclosure-control.md``, rule 3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations

from pyroaring import AbstractBitMap, FrozenBitMap

from .answer import FUNNEL_FIELDS, AnswerSets, Cell, ProtectionAudit
from .policy import DisclosurePolicy
from .registry import NewPublication, PublicationRef, PublicationRegistry, RegistryMatch

#: How a unit (a distinct set) got its publication.
_FRESH = "fresh"  # shown: its own rounded count
_PRIMARY = "primary"  # withheld: a small cell (rule 1)
_SECONDARY = "secondary"  # withheld: complementary suppression (rule 3)
_REPEAT = "repeat"  # identical to a published set: published as before
_NEAR = "near"  # near a published set: published as that one (rule 4)
_STRUCTURAL = "structural"  # empty by definition (population step), shown as 0
_VIRTUAL = "virtual"  # an implied set (e.g. dropped at a step); never published


@dataclass
class _PlannedSet:
    uid: int
    bits: FrozenBitMap
    count: int
    name: str
    origin: str
    hidden: bool = False
    exact: bool = False  # the shown value is this set's own (rounded) count
    value: int | None = None
    display: str = ""
    entry: int | None = None  # the registry entry reused (repeat, near)


@dataclass(frozen=True)
class _Relation:
    parent: int
    children: tuple[int, ...]


@dataclass(frozen=True)
class _Remainder:
    """An unknown remainder: its size, the known cells subtracted on the way, the unknown cells
    it consists of."""

    total: int
    known: tuple[int, ...]
    leaves: tuple[int, ...]

    def key(self, plan: ProtectionPlan) -> tuple[int, bool]:
        # smaller first; for equal sizes the one a reader could exploit (not all waived) first
        return (self.total, all(plan.waived(c) for c in self.leaves))


def _partition_error(what: str) -> ValueError:
    return ValueError(f"inconsistent answer sets: {what}")


class ProtectionPlan:
    """Cells (every published count, plus implied virtual ones), the units they belong to (one
    per distinct set), the relations between cells, and the fixed-point protection."""

    def __init__(self, answer: AnswerSets, policy: DisclosurePolicy) -> None:
        self.policy = policy
        self.names: list[str] = []
        self.cell_unit: list[int] = []
        self.units: list[_PlannedSet] = []
        self._by_set: dict[FrozenBitMap, int] = {}
        self.relations: list[_Relation] = []
        self.unprotectable: set[tuple[str, int]] = set()
        self.sites = sorted(answer.by_site)
        self.regions = sorted(answer.by_region)
        self.output: dict[str, int] = {}
        self.missing_data: set[int] = set()
        self.external: set[int] = set()  # cells of earlier answers (imported relations)
        self.own_relations = 0
        self._build(answer)
        self.own_relations = len(self.relations)
        self._index_relations()

    def _index_relations(self) -> None:
        self.parent_rels: list[list[int]] = [[] for _ in self.names]
        self.member_rels: list[list[int]] = [[] for _ in self.names]
        self.unit_cells: list[list[int]] = [[] for _ in self.units]
        for c, uid in enumerate(self.cell_unit):
            self.unit_cells[uid].append(c)
        for ri, rel in enumerate(self.relations):
            self.parent_rels[rel.parent].append(ri)
            for c in {rel.parent, *rel.children}:
                self.member_rels[c].append(ri)

    # -- building
    def _cell(
        self, name: str, bits: AbstractBitMap, kind: str = "real", published: bool = True
    ) -> int:
        """Add a cell; ``kind`` is ``real`` (published), ``structural`` (published, empty by
        definition) or ``virtual`` (implied, never published). Equal sets share a unit."""
        frozen = bits if isinstance(bits, FrozenBitMap) else FrozenBitMap(bits)
        index = len(self.names)
        self.names.append(name)
        if kind == "structural":
            uid = len(self.units)
            self.units.append(
                _PlannedSet(uid, frozen, 0, name, _STRUCTURAL, exact=True, value=0, display="0")
            )
        elif kind == "virtual":
            # its own variable: the reader knows only how it relates to published cells
            uid = len(self.units)
            self.units.append(_PlannedSet(uid, frozen, len(frozen), name, _VIRTUAL))
        else:
            found = self._by_set.get(frozen)
            if found is None:
                found = len(self.units)
                self.units.append(_PlannedSet(found, frozen, len(frozen), name, ""))
                self._by_set[frozen] = found
            uid = found
        self.cell_unit.append(uid)
        if published and kind != "virtual":
            self.output[name] = index
        return index

    def _relate(self, parent: int, children: Iterable[int]) -> None:
        rel = _Relation(parent, tuple(children))
        if rel.children and rel not in self.relations:
            self.relations.append(rel)

    def _build(self, answer: AnswerSets) -> None:
        cohort = FrozenBitMap(answer.cohort)
        # geography: sites partition the cohort (patients without a site form a virtual cell)
        for site in self.sites:
            if site not in answer.site_region:
                raise _partition_error(f"site {site!r} has no region")
        site_sets = {s: FrozenBitMap(answer.by_site[s]) for s in self.sites}
        covered = FrozenBitMap().union(*site_sets.values()) if site_sets else FrozenBitMap()
        if sum(len(b) for b in site_sets.values()) != len(covered):
            raise _partition_error("sites overlap")
        if not covered.issubset(cohort):
            raise _partition_error("a site holds patients outside the cohort")
        members: dict[str, list[str]] = {}
        for site in self.sites:
            members.setdefault(answer.site_region[site], []).append(site)
        if set(members) != set(self.regions):
            raise _partition_error("regions do not match the sites' regions")
        for region, region_sites in members.items():
            expected = FrozenBitMap().union(*(site_sets[s] for s in region_sites))
            if FrozenBitMap(answer.by_region[region]) != expected:
                raise _partition_error(f"region {region!r} is not the union of its sites")

        total = self._cell("total", cohort)
        regions = {r: self._cell(f"region:{r}", answer.by_region[r]) for r in self.regions}
        sites = {s: self._cell(f"site:{s}", site_sets[s]) for s in self.sites}

        # funnel
        steps: list[dict[str, int]] = []
        step_sets: list[dict[str, FrozenBitMap]] = []
        previous: FrozenBitMap | None = None
        for i, step in enumerate(answer.funnel):
            sets = {f: FrozenBitMap(getattr(step, f)) for f in FUNNEL_FIELDS}
            entered = sets["entered"]
            parts = [sets["passed"], sets["failed"], sets["unknown"]]
            if sum(len(p) for p in parts) != len(entered) or parts[0].union(*parts[1:]) != entered:
                raise _partition_error(
                    f"step {i}: passed, failed and unknown must partition entered"
                )
            if not sets["remaining"].issubset(entered):
                raise _partition_error(f"step {i}: remaining is not within entered")
            if previous is not None and entered != previous:
                raise _partition_error(f"step {i}: entered is not the previous step's remaining")
            previous = sets["remaining"]
            structural = step.kind == "population"
            cells: dict[str, int] = {}
            for f in FUNNEL_FIELDS:
                kind = (
                    "structural"
                    if structural and f in ("failed", "unknown") and not sets[f]
                    else "real"
                )
                cells[f] = self._cell(f"funnel:{i}:{f}", sets[f], kind)
            self.missing_data.add(cells["unknown"])
            steps.append(cells)
            step_sets.append(sets)

        # implied sets, never published: patients without a site, patients dropped at a step
        unsited = cohort - covered
        unsited_cell = self._cell("virtual:unsited", unsited, "virtual") if unsited else None
        extra = [unsited_cell] if unsited_cell is not None else []
        self._relate(total, [*regions.values(), *extra])
        self._relate(total, [*sites.values(), *extra])
        for region, names in sorted(members.items()):
            self._relate(regions[region], [sites[s] for s in names])

        for i, (cells, sets) in enumerate(zip(steps, step_sets, strict=True)):
            dropped = sets["entered"] - sets["remaining"]
            kind = (
                "structural" if answer.funnel[i].kind == "population" and not dropped else "virtual"
            )
            d = self._cell(f"virtual:{i}:dropped", dropped, kind, published=False)
            categories = ("passed", "failed", "unknown")
            self._relate(cells["entered"], [cells[c] for c in categories])
            self._relate(cells["entered"], [cells["remaining"], d])
            # What goes on: passed, or passed and unknown (exclusions that keep missing data).
            # A reader knows which from the question, so every reading that holds is a relation
            # (both when nobody is unknown); other shapes fall back to the smallest union.
            plausible: tuple[tuple[str, ...], ...] = (("passed",), ("passed", "unknown"))
            readings = [
                kept
                for kept in plausible
                if FrozenBitMap().union(*(sets[c] for c in kept)) == sets["remaining"]
            ]
            if not readings:
                fallback = self._union_of(sets["remaining"], sets, categories)
                readings = [fallback] if fallback is not None else []
            for kept in readings:
                self._relate(cells["remaining"], [cells[c] for c in kept])
                self._relate(d, [cells[c] for c in categories if c not in kept])
            if i + 1 < len(steps):
                self._relate(cells["remaining"], [steps[i + 1]["entered"]])
        if steps and step_sets[-1]["remaining"] == cohort:
            self._relate(steps[-1]["remaining"], [total])
        self._build_extra(answer, total, regions, sites, steps)

    def _build_extra(
        self,
        answer: AnswerSets,
        total: int,
        regions: Mapping[str, int],
        sites: Mapping[str, int],
        steps: Sequence[Mapping[str, int]],
    ) -> None:
        """Further published sets and the breakdowns a reader knows between cells: each
        breakdown's parts must be disjoint subsets of its parent; the patients of the parent in
        no part are a never-published cell (protected like patients without a site)."""
        by_name: dict[str, int] = {"total": total}
        by_name.update({f"region:{r}": c for r, c in regions.items()})
        by_name.update({f"site:{s}": c for s, c in sites.items()})
        for i, cells in enumerate(steps):
            by_name.update({f"funnel:{i}:{f}": c for f, c in cells.items()})
        first_of_unit: dict[int, int] = {}
        for c, uid in enumerate(self.cell_unit):
            first_of_unit.setdefault(uid, c)
        for name in sorted(answer.extra):
            if name in by_name or name.startswith(("virtual:", "external:")):
                raise _partition_error(f"extra cell {name!r} has a reserved name")
            empty_by_definition = name in answer.structural and not answer.extra[name]
            kind = "structural" if empty_by_definition else "real"
            c = self._cell(name, answer.extra[name], kind)
            by_name[name] = c
            earlier = first_of_unit.setdefault(self.cell_unit[c], c)
            if earlier != c:
                # the same set as another cell: a reader who knows it (the cohort without the
                # last step is that step's entered) combines the two, so the audit does too
                self._relate(earlier, [c])
        for breakdown in answer.breakdowns:
            names = (breakdown.parent, *breakdown.parts)
            missing = [n for n in names if n not in by_name]
            if missing:
                raise _partition_error(f"breakdown names unknown cells {missing}")
            parent = self.unit(by_name[breakdown.parent]).bits
            parts = [self.unit(by_name[n]).bits for n in breakdown.parts]
            covered = FrozenBitMap().union(*parts) if parts else FrozenBitMap()
            if sum(len(p) for p in parts) != len(covered):
                raise _partition_error(f"the parts of {breakdown.parent!r} overlap")
            if not covered.issubset(parent):
                raise _partition_error(f"a part of {breakdown.parent!r} is not within it")
            children = [by_name[n] for n in breakdown.parts]
            rest = parent - covered
            if rest:
                children.append(self._cell(f"virtual:rest:{breakdown.parent}", rest, "virtual"))
            self._relate(by_name[breakdown.parent], children)

    @staticmethod
    def _union_of(
        target: FrozenBitMap, sets: Mapping[str, FrozenBitMap], names: Sequence[str]
    ) -> tuple[str, ...] | None:
        for size in range(1, len(names) + 1):
            for combo in combinations(names, size):
                if FrozenBitMap().union(*(sets[c] for c in combo)) == target:
                    return combo
        return None

    # -- state
    def unit(self, c: int) -> _PlannedSet:
        return self.units[self.cell_unit[c]]

    def known(self, c: int) -> bool:
        """Does a reader know this cell's count? Shown exactly; empty by definition; or a zero
        count of patients without data (often structurally zero: criteria on codes are never
        unknown), which is therefore never relied on to protect anything, although shown as
        withheld under ``suppress_zero``."""
        u = self.unit(c)
        if u.origin == _STRUCTURAL or (not u.hidden and u.exact):
            return True
        return u.count == 0 and (c in self.missing_data or c in self.external)

    def count(self, c: int) -> int:
        return self.unit(c).count

    def waived(self, c: int) -> bool:
        """A never-published (virtual) cell that may be derived: its count is not small."""
        u = self.unit(c)
        return u.origin == _VIRTUAL and not self.policy.is_small(u.count)

    def small_group(self, cells: Sequence[int]) -> bool:
        """Would knowing the total of ``cells`` disclose a small group? Fewer than the threshold
        and more than none; or none at all under ``suppress_zero``, unless every cell in it may be
        derived anyway."""
        total = sum(self.count(c) for c in cells)
        if total == 0:
            return self.policy.suppress_zero and any(not self.waived(c) for c in cells)
        return total < self.policy.threshold

    def movable(self, c: int) -> bool:
        """Shown fresh in this answer, so it can still be withheld."""
        u = self.unit(c)
        return u.origin == _FRESH and not u.hidden

    def _sort_key(self, c: int) -> tuple[int, str]:
        return (self.count(c), self.unit(c).name)

    def initialise(self, match: Callable[[FrozenBitMap], RegistryMatch | None]) -> None:
        policy = self.policy
        for u in self.units:
            if u.origin in (_STRUCTURAL, _VIRTUAL):
                continue
            found = match(u.bits)
            if found is not None:
                e = found.entry
                u.origin = _REPEAT if found.exact else _NEAR
                u.hidden, u.value, u.display, u.entry = e.hidden, e.value, e.display, e.id
                u.exact = found.exact and e.fresh and not e.hidden
            elif policy.is_small(u.count):
                u.origin, u.hidden, u.display = _PRIMARY, True, policy.withheld_display
            else:
                u.origin, u.exact = _FRESH, True
                u.value = policy.rounded(u.count)
                u.display = str(u.value)

    def import_relations(self, registry: PublicationRegistry) -> None:
        """Relations recorded by earlier answers that involve sets this answer publishes again:
        a reader can combine them with this answer's. Their other sets become external cells
        (never published here, with their earlier publication)."""
        by_entry = {  # the empty set is everywhere: sharing it links nothing
            u.entry: self.unit_cells[u.uid][0]
            for u in self.units
            if u.origin == _REPEAT and u.entry is not None and u.count
        }
        if not by_entry:
            return
        own = set(by_entry)
        for parent, children in registry.relations_of(sorted(own)):
            # touching one set of this answer only, a relation adds nothing: its other sets keep
            # the publication they had when it was protected
            if len(own.intersection((parent, *children))) < 2:
                continue
            terms = []
            for entry_id in (parent, *children):
                if entry_id not in by_entry:
                    e = registry.entry(entry_id)
                    c = len(self.names)
                    self.names.append(f"external:{entry_id}")
                    uid = len(self.units)
                    self.units.append(
                        _PlannedSet(
                            uid,
                            e.bits,
                            len(e.bits),
                            f"external:{entry_id}",
                            _REPEAT,
                            hidden=e.hidden,
                            exact=e.fresh and not e.hidden,
                            value=e.value,
                            display=e.display,
                            entry=entry_id,
                        )
                    )
                    self.cell_unit.append(uid)
                    self.external.add(c)
                    by_entry[entry_id] = c
                terms.append(by_entry[entry_id])
            self._relate(terms[0], terms[1:])
        self._index_relations()

    def _withhold(self, cells: Iterable[int]) -> None:
        for c in cells:
            u = self.unit(c)
            if u.origin == _FRESH and not u.hidden:
                u.origin, u.hidden, u.exact = _SECONDARY, True, False
                u.value, u.display = None, self.policy.withheld_display

    # -- rule 3
    def _peel(self, withheld: int | None = None) -> set[int]:
        """Cells a reader pins down relation by relation (one unknown term left, repeatedly),
        if the unit ``withheld`` were withheld too. Cells that may be derived (``waived``) count
        as known once pinned; the others are returned."""
        unknown = [
            not self.known(c) or self.cell_unit[c] == withheld for c in range(len(self.names))
        ]
        open_terms = [
            sum(1 for c in {rel.parent, *rel.children} if unknown[c]) for rel in self.relations
        ]
        queue = [ri for ri, n in enumerate(open_terms) if n == 1]
        pinned: set[int] = set()
        while queue:
            rel = self.relations[queue.pop()]
            left = [c for c in {rel.parent, *rel.children} if unknown[c]]
            if len(left) != 1:
                continue
            c = left[0]
            unknown[c] = False
            if not self.waived(c):
                pinned.add(c)
            for ri in self.member_rels[c]:
                open_terms[ri] -= 1
                if open_terms[ri] == 1:
                    queue.append(ri)
        return pinned

    def _choice_key(self, c: int, baseline: set[int]) -> tuple[bool, bool, int, str]:
        """Prefer cells whose withholding lets a reader pin down nothing new (not even
        themselves), then parts over subtotals (a withheld subtotal opens deeper combinations),
        then the smallest, then by name."""
        uid = self.cell_unit[c]
        breaks = bool(self._peel(uid) - baseline)
        internal = any(self.parent_rels[d] for d in self.unit_cells[uid])
        return (breaks, internal, self.count(c), self.unit(c).name)

    def _options(self, parent: int, candidates: Sequence[int]) -> list[int]:
        """Which cells to withhold: the smallest fresh shown non-zero candidate (preferring those
        whose withholding breaks no other relation; ties by count, then name); else the parent;
        else every fresh shown candidate. Empty: nothing left that can be withheld."""
        fresh = sorted({c for c in candidates if self.movable(c)}, key=self._sort_key)
        non_zero = [c for c in fresh if self.count(c) > 0]
        if non_zero:
            if len(non_zero) == 1:
                return non_zero
            baseline = self._peel()
            return [min(non_zero, key=lambda c: self._choice_key(c, baseline))]
        if self.movable(parent):
            return [parent]
        return fresh

    def _local(self, rel: _Relation) -> list[int] | None:
        terms = (rel.parent, *rel.children)
        unknown = [c for c in terms if not self.known(c)]
        violated = len(unknown) == 1 and not self.waived(unknown[0])
        if not violated and self.known(rel.parent):
            hidden = [c for c in rel.children if not self.known(c)]
            violated = bool(hidden) and self.small_group(hidden)
        return self._options(rel.parent, rel.children) if violated else None

    def _expand(self, c: int, memo: dict[int, _Remainder], stack: set[int]) -> _Remainder:
        """The smallest unknown remainder of unknown cell ``c``: itself, or the unknown parts of
        one of its breakdowns (recursively), with the known cells met on the way."""
        if c in memo:
            return memo[c]
        best = _Remainder(self.count(c), (), (c,))
        if c in stack:
            return best
        stack.add(c)
        for ri in self.parent_rels[c]:
            option = self._frontier(self.relations[ri].children, memo, stack)
            if option.key(self) < best.key(self):
                best = option
        stack.discard(c)
        memo[c] = best
        return best

    def _frontier(
        self, children: Sequence[int], memo: dict[int, _Remainder], stack: set[int]
    ) -> _Remainder:
        total = 0
        known: list[int] = []
        leaves: list[int] = []
        for d in children:
            if self.known(d):
                known.append(d)
            else:
                part = self._expand(d, memo, stack)
                total += part.total
                known.extend(part.known)
                leaves.extend(part.leaves)
        return _Remainder(total, tuple(known), tuple(leaves))

    def _deep(self, rel: _Relation, memo: dict[int, _Remainder]) -> list[int] | None:
        """A known parent minus everything known below it through withheld cells must not leave
        a small group."""
        if not self.known(rel.parent) or all(self.known(c) for c in rel.children):
            return None
        front = self._frontier(rel.children, memo, set())
        if not self.small_group(front.leaves):
            return None
        return self._options(rel.parent, front.known)

    def _sweep(self) -> None:
        while True:
            changed = False
            memo: dict[int, _Remainder] = {}
            for rel in self.relations:
                options = self._local(rel)
                if options is None:
                    options = self._deep(rel, memo)
                if options is None:
                    continue
                if not options:
                    continue  # nothing left to withhold here; reported after the fixed point
                self._withhold(options)
                memo.clear()
                changed = True
            if not changed:
                return

    def _derivations(self) -> dict[int, set[int]]:
        """Unknown cells a reader can determine exactly from the shown ones, each with the
        known cells its derivation uses (waived cells left out)."""
        unknown = {c for c in range(len(self.names)) if not self.known(c)}
        rows: list[dict[int, int]] = []
        for rel in self.relations:
            row: dict[int, int] = {rel.parent: 1}
            for c in rel.children:
                row[c] = row.get(c, 0) - 1
            rows.append(row)
        return {
            c: witness for c, witness in _determined(rows, unknown).items() if not self.waived(c)
        }

    def _derivable(self) -> list[int]:
        return sorted(self._derivations())

    def _fix_derivable(self) -> bool:
        """Withhold a fresh cell that a derivation uses (smallest, as for the relations)."""
        for _, witness in sorted(self._derivations().items()):
            fresh = sorted({d for d in witness if self.movable(d)}, key=self._sort_key)
            if not fresh:
                continue  # derived from earlier publications only: reported as unprotectable
            non_zero = [d for d in fresh if self.count(d) > 0]
            baseline = self._peel()
            self._withhold([min(non_zero or fresh, key=lambda d: self._choice_key(d, baseline))])
            return True
        return False

    def _near_pairs(self) -> bool:
        """Two fresh shown sets of this answer closer than the threshold: withhold the later."""
        t = self.policy.threshold
        shown = [u for u in self.units if u.origin == _FRESH and not u.hidden]
        for j, later in enumerate(shown):
            for earlier in shown[:j]:
                if abs(later.count - earlier.count) >= t or earlier.hidden:
                    continue
                if 0 < later.bits.symmetric_difference_cardinality(earlier.bits) < t:
                    later.origin, later.hidden, later.exact = _SECONDARY, True, False
                    later.value, later.display = None, self.policy.withheld_display
                    return True
        return False

    def solve(self) -> None:
        while True:
            self._sweep()
            if self._fix_derivable():
                continue
            if self._near_pairs():
                continue
            break
        # what could not be protected (every candidate had been published before)
        memo: dict[int, _Remainder] = {}
        self.unprotectable = {
            ("relation", ri)
            for ri, rel in enumerate(self.relations)
            if self._local(rel) is not None or self._deep(rel, memo) is not None
        }
        self.unprotectable |= {("cell", c) for c in self._derivable()}

    # -- output
    def cell(self, name: str) -> Cell:
        u = self.unit(self.output[name])
        if u.hidden:
            return Cell(None, u.display, True)
        return Cell(u.value, u.display, False)

    def publications(
        self,
    ) -> tuple[list[NewPublication], list[tuple[PublicationRef, list[PublicationRef]]]]:
        """This answer's new publications, and its relations in terms of publications (relations
        with a never-published term are left out; structural zeros drop out of the sums)."""
        rows: list[NewPublication] = []
        refs: dict[int, PublicationRef] = {}
        for u in self.units:
            if u.origin == _REPEAT and u.entry is not None:
                refs[u.uid] = u.entry
            if u.origin in (_STRUCTURAL, _VIRTUAL, _REPEAT):
                continue
            refs[u.uid] = ("new", len(rows))
            rows.append(
                NewPublication(
                    bits=u.bits,
                    value=None if u.hidden else u.value,
                    display=u.display,
                    hidden=u.hidden,
                    copied_from=u.entry if u.origin == _NEAR else None,
                )
            )
        relations: list[tuple[PublicationRef, list[PublicationRef]]] = []
        for rel in self.relations[: self.own_relations]:
            parent_uid = self.cell_unit[rel.parent]
            child_uids = [self.cell_unit[c] for c in rel.children]
            if parent_uid not in refs or any(
                self.units[uid].origin == _VIRTUAL for uid in child_uids
            ):
                continue
            children = [refs[uid] for uid in child_uids if uid in refs]  # structural: 0
            if children and children != [refs[parent_uid]]:
                relations.append((refs[parent_uid], children))
        return rows, relations

    def displays(self) -> dict[str, str]:
        """What the reader sees of every published cell, by name."""
        return {name: self.unit(index).display for name, index in sorted(self.output.items())}

    def audit(self, seen: Mapping[str, Sequence[str]] | None = None) -> ProtectionAudit:
        """Counts for the audit log. ``seen``: per cell, the displays the organisation got for
        this question before; a copied cell showing one of them is a repeat to that reader, not
        an overlap hit."""
        counts = {k: 0 for k in (_PRIMARY, _SECONDARY, _NEAR, _REPEAT)}
        seen = seen or {}
        for name, index in self.output.items():
            unit = self.unit(index)
            if unit.origin == _NEAR and unit.display in seen.get(name, ()):
                continue
            if unit.origin in counts:
                counts[unit.origin] += 1
        return ProtectionAudit(
            cells=len(self.output),
            primary_suppressed=counts[_PRIMARY],
            secondary_suppressed=counts[_SECONDARY],
            overlap_hits=counts[_NEAR],
            repeated=counts[_REPEAT],
            unprotectable=len(self.unprotectable),
        )


def _determined(rows: Iterable[Mapping[int, int]], unknown: set[int]) -> dict[int, set[int]]:
    """Unknowns fixed by the linear relations ``rows`` (coefficients over all variables; those
    not in ``unknown`` are known), in exact arithmetic, each with the known variables its value
    is computed from. Reduced row-echelon form over the unknown columns: an unknown is fixed iff
    its pivot row has no other unknown entry."""
    pivots: dict[int, dict[int, Fraction]] = {}
    for raw in rows:
        row = {k: Fraction(v) for k, v in raw.items() if v}
        for p, prow in pivots.items():
            f = row.get(p)
            if f:
                _subtract(row, prow, f)
        free = [k for k in row if k in unknown]
        if not free:
            continue
        p = min(free)
        inverse = 1 / row[p]
        row = {k: v * inverse for k, v in row.items()}
        for qrow in pivots.values():
            f = qrow.get(p)
            if f:
                _subtract(qrow, row, f)
        pivots[p] = row
    return {
        p: {k for k in row if k not in unknown}
        for p, row in pivots.items()
        if all(k == p or k not in unknown for k in row)
    }


def _subtract(target: dict[int, Fraction], row: Mapping[int, Fraction], factor: Fraction) -> None:
    for k, v in row.items():
        value = target.get(k, Fraction(0)) - factor * v
        if value:
            target[k] = value
        else:
            target.pop(k, None)


__all__ = ["ProtectionPlan"]
