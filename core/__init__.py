"""Shared core: the ground every domain package stands on.

What is here is read by ``fhir_adapters``, ``feasibility``, ``recruitment`` and
``surveillance_stream`` alike (codes, the patient view; later configuration, security, audit).
It must not import any domain or application package: dependencies point down to it, never up
from it. See ``docs/explanation/architecture.md``.
"""
