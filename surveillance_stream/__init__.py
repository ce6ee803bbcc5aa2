"""The stream: a Faust worker that keeps each patient's state from the facts topic and, per
event, the live cohorts of saved questions (:mod:`.cohorts`) and each patient's device
contribution (:mod:`.device_stream`); the signal monitor (:mod:`.monitor`) sums the
contributions and computes safety signals (:mod:`.signals`, :mod:`.statistics`).

Started by ``concierge worker`` (``concierge/commands/worker.py``). See "The stream" in
``docs/explanation/architecture.md``, ``docs/explanation/device-surveillance.md`` and
``docs/explanation/statistics.md``.
"""
