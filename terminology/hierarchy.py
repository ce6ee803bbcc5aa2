"""The active is-a hierarchy of a SNOMED CT release, in compact arrays.

Concepts are numbered by position in the sorted array of their ids; parents and children are
two CSR adjacency arrays (``ptr[i]:ptr[i + 1]`` slices ``adj``). A UK release (about 370k
concepts and 600k active is-a rows) takes a few tens of MB this way, against several hundred
as Python sets. Closures (descendants, ancestors) walk the graph a level at a time with numpy,
so ``<< 138875005`` (everything) costs milliseconds rather than a Python loop per concept.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Ids = npt.NDArray[np.int64]
Index = npt.NDArray[np.int32]
EMPTY = np.zeros(0, dtype=np.int32)


def _csr(n: int, source: Index, target: Index) -> tuple[Index, Index]:
    order = np.argsort(source, kind="stable")
    counts = np.bincount(source, minlength=n)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr.astype(np.int32), target[order].astype(np.int32)


def _gather(ptr: Index, adj: Index, frontier: Index) -> Index:
    """Every neighbour of every node in ``frontier`` (with repeats), vectorised."""
    starts = ptr[frontier].astype(np.int64)
    lengths = ptr[frontier + 1].astype(np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return EMPTY
    firsts = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - firsts, lengths) + np.arange(total, dtype=np.int64)
    return adj[positions]


@dataclass(frozen=True)
class Hierarchy:
    """Active concepts (``ids``, sorted) and the active is-a edges between them."""

    ids: Ids
    parent_ptr: Index
    parents: Index
    child_ptr: Index
    children: Index

    @classmethod
    def build(
        cls,
        ids: Iterable[int] | Ids,
        edges: Iterable[tuple[int, int]] | None = None,
        child_ids: Ids | None = None,
        parent_ids: Ids | None = None,
    ) -> Hierarchy:
        """From concept ids and ``(child, parent)`` is-a edges (or two arrays of them). Edges
        naming a concept not among ``ids`` are dropped (an inactive concept, or a relationship
        row left active on one)."""
        concept_ids = np.unique(
            np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        )
        if edges is not None:
            pairs = np.asarray(list(edges), dtype=np.int64).reshape(-1, 2)
            child_ids, parent_ids = pairs[:, 0], pairs[:, 1]
        assert child_ids is not None and parent_ids is not None
        n = len(concept_ids)
        c = np.searchsorted(concept_ids, child_ids)
        p = np.searchsorted(concept_ids, parent_ids)
        c_ok = (c < n) & (concept_ids[np.minimum(c, n - 1)] == child_ids) if n else c < 0
        p_ok = (p < n) & (concept_ids[np.minimum(p, n - 1)] == parent_ids) if n else p < 0
        keep = c_ok & p_ok & (child_ids != parent_ids)
        pairs = (
            np.unique(np.stack([c[keep], p[keep]], axis=1), axis=0)
            if keep.any()
            else (np.zeros((0, 2), dtype=np.int64))
        )
        child_idx = pairs[:, 0].astype(np.int32)
        parent_idx = pairs[:, 1].astype(np.int32)
        parent_ptr, parents = _csr(n, child_idx, parent_idx)
        child_ptr, children = _csr(n, parent_idx, child_idx)
        return cls(concept_ids, parent_ptr, parents, child_ptr, children)

    # ------------------------------------------------------------------ look-ups

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def edge_count(self) -> int:
        return len(self.parents)

    def index_of(self, sctid: int) -> int | None:
        i = int(np.searchsorted(self.ids, sctid))
        if i < len(self.ids) and int(self.ids[i]) == sctid:
            return i
        return None

    def indices(self, sctids: Iterable[int]) -> Index:
        wanted = np.asarray(list(sctids), dtype=np.int64)
        i = np.searchsorted(self.ids, wanted)
        ok = (i < len(self.ids)) & (self.ids[np.minimum(i, len(self.ids) - 1)] == wanted)
        return np.unique(i[ok].astype(np.int32))

    def codes(self, index: Index) -> list[str]:
        """The concept ids at ``index`` as codes (strings), in id order."""
        return [str(v) for v in np.sort(self.ids[index])]

    def parents_of(self, i: int) -> Index:
        return self.parents[self.parent_ptr[i] : self.parent_ptr[i + 1]]

    def children_of(self, i: int) -> Index:
        return self.children[self.child_ptr[i] : self.child_ptr[i + 1]]

    # ------------------------------------------------------------------ closures

    def everything(self) -> Index:
        return np.arange(len(self.ids), dtype=np.int32)

    def step(self, seeds: Index, down: bool) -> Index:
        """Direct children (``down``) or parents of any seed."""
        ptr, adj = (self.child_ptr, self.children) if down else (self.parent_ptr, self.parents)
        return np.unique(_gather(ptr, adj, seeds))

    def closure(self, seeds: Index, down: bool) -> Index:
        """Every proper descendant (``down``) or ancestor of any seed: a seed is in it only when
        it descends from (or is an ancestor of) another seed."""
        ptr, adj = (self.child_ptr, self.children) if down else (self.parent_ptr, self.parents)
        seen = np.zeros(len(self.ids), dtype=bool)
        frontier = np.unique(seeds.astype(np.int32))
        while len(frontier):
            reached = _gather(ptr, adj, frontier)
            reached = np.unique(reached[~seen[reached]])
            seen[reached] = True
            frontier = reached
        return np.flatnonzero(seen).astype(np.int32)

    def descendant_counts(self) -> npt.NDArray[np.int64]:
        """How many proper descendants each concept has. Each concept's ancestors are walked
        once (the work is the size of the transitive closure: some tens of millions of steps
        for a UK release, done once per load)."""
        n = len(self.ids)
        counts = np.zeros(n, dtype=np.int64)
        ptr = self.parent_ptr.tolist()
        adj = self.parents.tolist()
        # ancestors of a concept = its parents and their ancestors; memoised per concept as a
        # tuple only while a child still needs it would save little: walk instead
        for i in range(n):
            start, end = ptr[i], ptr[i + 1]
            if start == end:
                continue
            seen = set(adj[start:end])
            stack = list(seen)
            while stack:
                j = stack.pop()
                for k in adj[ptr[j] : ptr[j + 1]]:
                    if k not in seen:
                        seen.add(k)
                        stack.append(k)
            counts[np.fromiter(seen, dtype=np.int64, count=len(seen))] += 1
        return counts

    # ------------------------------------------------------------------ storage

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            ids=self.ids,
            parent_ptr=self.parent_ptr,
            parents=self.parents,
            child_ptr=self.child_ptr,
            children=self.children,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Hierarchy:
        with np.load(io.BytesIO(data)) as arrays:
            return cls(
                arrays["ids"],
                arrays["parent_ptr"],
                arrays["parents"],
                arrays["child_ptr"],
                arrays["children"],
            )


__all__ = ["EMPTY", "Hierarchy", "Index"]
