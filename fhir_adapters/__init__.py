"""The adapters: FHIR resources in (files, Bulk NDJSON, Bundles, the REST endpoint, Subscriptions),
validated, pseudonymised and published as facts on the facts topic; identities stay in the site's
vault (:mod:`.vault`).

:mod:`.pipeline` is the one ingest path every input goes through; the message contracts it
publishes are in ``core/contracts/facts.py``; its CLI verbs are ``concierge ingest`` and
``concierge generate`` (``concierge/commands/``). See "The adapters" in
``docs/explanation/architecture.md`` and ``docs/explanation/privacy.md``.
"""
