"""Helpers shared by the adapter tests."""

from __future__ import annotations

from fhir_adapters.pipeline import Ingestor


def public_key(ingestor: Ingestor, rkey: str) -> str:
    """The key a resource is published under: Patients go by pseudonym, never their source id."""
    source, rtype, _ = rkey.split("|")
    if rtype != "Patient":
        return rkey
    pseudonym = ingestor.patient_by_key(rkey)
    return f"{source}|Patient|{pseudonym}" if pseudonym else rkey
