"""Saved questions follow the terminology: when a new SNOMED CT release or new ValueSets are
loaded, every active saved question whose ECL or ValueSet entries now expand to other codes is
compiled again and published as a new version of its record on the trials topic. The stream
re-evaluates every patient at a new version, so the patients the change moves enter or leave
the cohort (one cohort event each), through the path every registration takes.

The refresher runs in the API (the writer of the trials topic) and looks at the store's load
``generation`` every ``CONCIERGE_TERMINOLOGY_REFRESH_SECONDS``; after a restart it compares
every saved question once, so a release loaded while the API was down is caught up.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from .expansion import ExpansionSource, compile_question, expansions, needs_expansion
from .saved import SavedQuestions

log = logging.getLogger(__name__)


class Generational(ExpansionSource, Protocol):
    def generation(self) -> int: ...


class ExpansionRefresher:
    """Re-expands saved questions after terminology loads (:meth:`check`; :meth:`start` runs it
    every ``interval`` seconds on a daemon thread)."""

    def __init__(self, saved: SavedQuestions, terminology: Generational, interval: float) -> None:
        self.saved = saved
        self.terminology = terminology
        self.interval = interval
        self.seen: int | None = None
        #: trial id -> why its expansion could not be refreshed (kept at its last version)
        self.problems: dict[str, str] = {}
        self.revised: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """Publish a new version of each active saved question whose expansions changed since
        the last load; returns their ids. Does nothing until the registry is ready (a new
        version numbered from a registry that has not read the topic would be ignored)."""
        generation = self.terminology.generation()
        if generation == self.seen:
            return []
        if not self.saved.readiness().ready:
            return []
        revised: list[str] = []
        for trial in list(self.saved.trials.values()):
            if trial.status != "active" or not needs_expansion(trial.criteria):
                continue
            try:
                compiled = compile_question(trial.criteria, self.terminology)
            except ValueError as exc:
                self.problems[trial.id] = str(exc)
                log.error("saved question %s: expansions not refreshed: %s", trial.id, exc)
                continue
            self.problems.pop(trial.id, None)
            if expansions(compiled.question) == expansions(trial.criteria):
                continue
            record = self.saved.revise(trial.id, compiled.question)
            self.revised.append((trial.id, record.version))
            revised.append(trial.id)
            log.info(
                "saved question %s: expansions changed with the terminology; version %s",
                trial.id,
                record.version,
            )
        self.seen = generation
        return revised

    def status(self) -> dict[str, Any]:
        return {
            "generation_seen": self.seen,
            "problems": dict(self.problems),
            "revised": [{"trial": t, "version": v} for t, v in self.revised[-20:]],
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the loop must survive a store or broker hiccup; logged
                log.exception("terminology refresh failed; trying again")

    def start(self) -> ExpansionRefresher:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="terminology-refresh", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["ExpansionRefresher"]
