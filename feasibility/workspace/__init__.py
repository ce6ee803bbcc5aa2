"""The sponsor workspace: site selection, the accrual forecast, criterion impact, the cohort
profile, the live count's history and each sponsor's past answers, every output under the same
disclosure control as the funnel. See ``docs/explanation/sponsor-workspace.md``.

Modules: :mod:`.outputs` (the sets each output publishes, and their layout), :mod:`.forecast`
(the accrual model), :mod:`.history` (the stores of cohort changes and past answers),
:mod:`.service` (:class:`~.service.Workspace`, the answers), :mod:`.export` (CSV and report).
"""
