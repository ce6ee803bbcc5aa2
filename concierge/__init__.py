"""The application layer: the FastAPI app (:mod:`.api`, routes in :mod:`.routes`), every
``concierge`` command-line verb (:mod:`.cli`, verbs in :mod:`.commands`), the demo, and the
configuration tree (:mod:`.configuration`) validated when a process starts.

It sits on top: it wires the domain packages together and nothing imports it (``lint-imports``
checks the layers). Shared settings, security, audit and HTTP errors live in :mod:`core`. See
``docs/explanation/architecture.md``.
"""
