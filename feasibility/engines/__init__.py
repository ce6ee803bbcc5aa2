"""Engines: interchangeable interpreters of the criteria model.

* :mod:`.base` - what an engine promises (:class:`~.base.QueryEngine`, and
  :class:`~.base.FrameEngine` for one that evaluates over a snapshot's frames); each engine
  declares which it satisfies, and mypy checks it.
* :mod:`.reference` - a plain per-patient interpreter, written for clarity: the oracle.
* :mod:`.incremental` - the per-patient evaluator the stream uses for saved questions: compiled
  matchers, the set of codes a question depends on, and when its answer can next change.
* :mod:`.polars_engine` - vectorised evaluation over a columnar snapshot, for ad hoc questions.

All three return, per patient, the result of every funnel step (TRUE / FALSE / UNKNOWN) and
whether the patient is in the cohort; :mod:`.results` turns those into counts and funnels.
"""
