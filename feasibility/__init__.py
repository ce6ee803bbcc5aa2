"""Feasibility: how many patients a trial's criteria would find, answered to sponsors under
disclosure control.

The criteria model (:mod:`.criteria`), the engines that evaluate it (:mod:`.engines`, behind
:class:`~.engines.base.QueryEngine`), the columnar snapshot they read (:mod:`.snapshot`), the
views kept current from topics (:mod:`.feed`, :mod:`.live`, :mod:`.saved`, :mod:`.sites`) and
the service that answers from them (:mod:`.service`), with disclosure control in
:mod:`.disclosure`. The HTTP routes and CLI verbs are the application's
(``concierge/routes/feasibility.py``, ``concierge/commands/feasibility.py``). See "Feasibility"
in ``docs/explanation/architecture.md`` and ``docs/explanation/disclosure-control.md``.
"""
