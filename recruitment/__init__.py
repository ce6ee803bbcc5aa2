"""Recruitment: cohort entries become candidates, routed to the patient's own clinician.

Layers, each usable alone:

* :mod:`recruitment.lifecycle` and :mod:`recruitment.rules`, :mod:`recruitment.routing`: the
  invitation state machine, the rules that hold candidates back, and routing, as pure functions;
* :mod:`recruitment.models`, :mod:`recruitment.db`: the database (SQLAlchemy 2, Alembic);
* :mod:`recruitment.service`: applies topic messages and clinician actions, idempotently;
* :mod:`recruitment.consumer`: the Kafka consumer (one transaction per batch, offsets with it);
* :mod:`recruitment.notify`, :mod:`recruitment.scheduler`: the outbox, delivery, scheduled work;
* :mod:`recruitment.access`: who sees whom; :mod:`recruitment.funnel`: the sponsor funnel's counts;
* in the application layer: the clinician API (:mod:`concierge.routes.recruitment`) and
  its verbs ``concierge recruitment run | migrate | dispatch | funnel``
  (:mod:`concierge.commands.recruitment`).

Identifiable data is read only by the clinician API, from the identity vault, for the clinician's
own patients; nothing here logs it or stores it.

See "Recruitment" in ``docs/explanation/architecture.md`` and ``docs/reference/recruitment.md``.
"""
