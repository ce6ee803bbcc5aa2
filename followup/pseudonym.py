"""Per-trial pseudonyms: a participant is known to each trial by a key of that trial's own.

The site's pseudonym (``fhir_adapters.pseudonym``) is one key for everything inside the site. A
trial gets ``HMAC-SHA256(k_trial, site pseudonym)``, where ``k_trial`` is derived from the
follow-up secret with HKDF (RFC 5869, from ``cryptography``) with the trial id as its info: two
trials' feeds name the same patient by unrelated values, so pooling them links nobody, and no
trial can reverse its pseudonym to the site's one without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO_PREFIX = b"concierge follow-up trial key/1:"


@lru_cache(maxsize=1024)
def trial_key(secret: bytes, trial_id: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=INFO_PREFIX + trial_id.encode()
    ).derive(secret)


def trial_pseudonym(secret: bytes, trial_id: str, patient: str) -> str:
    """The participant's name in ``trial_id``'s feed (32 hex characters)."""
    return hmac.new(trial_key(secret, trial_id), patient.encode(), hashlib.sha256).hexdigest()[:32]
