"""Patient pseudonyms: a keyed HMAC of the patient's source identifiers.

The key is the site's secret (``CONCIERGE_PSEUDONYM_KEY``) and never leaves the site, so a
pseudonym cannot be reversed or recomputed elsewhere. The identifier hashed is the most stable one
the source gives, in a fixed order of preference: NHS number, other national identifiers, then the
source system and the Patient's logical id.
"""

from __future__ import annotations

import hashlib
import hmac

from .extract import NHS_NUMBER_SYSTEM

#: Identifier systems preferred, most stable first.
PREFERRED_SYSTEMS: tuple[str, ...] = (
    NHS_NUMBER_SYSTEM,
    "https://fhir.nhs.uk/Id/nhs-number",
    "http://hl7.org/fhir/sid/us-ssn",
)


class Pseudonymiser:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    def token(self, token: str) -> str:
        digest = hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()
        return f"p-{digest[:32]}"

    def preferred_token(self, identifiers: list[str], source: str, resource_id: str) -> str:
        for system in PREFERRED_SYSTEMS:
            for token in identifiers:
                if token.startswith(system + "|"):
                    return token
        return f"{source}|Patient/{resource_id}"

    def for_patient(self, identifiers: list[str], source: str, resource_id: str) -> str:
        return self.token(self.preferred_token(identifiers, source, resource_id))
