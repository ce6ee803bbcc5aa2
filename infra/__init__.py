"""Infrastructure under the domain packages: the topics (:mod:`.topics`, created by
:mod:`.topics_admin`), the one topic mirror with its lag and readiness (:mod:`.mirror`), a probe
endpoint for processes without an API (:mod:`.status_http`), and the local Apache Kafka (KRaft)
broker with its settings (:mod:`.broker`, :mod:`.settings`).

Its CLI verbs are ``concierge broker`` and ``concierge topics`` (``concierge/commands/infra.py``).
See "Kafka" and "Faults, readiness and recovery" in ``docs/explanation/architecture.md``.
"""
