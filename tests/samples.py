"""Where the third-party FHIR samples (Synthea R4 patients, not written here) are found."""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def synthea_r4() -> Path:
    """``$CONCIERGE_FHIR_SAMPLES``, else ``shared/fhir-samples/synthea-r4`` beside the checkout,
    else under ``/work/shared`` (the workplace's copy); the first that exists. Tests that need
    them assert they are there, so a missing folder fails rather than skips."""
    beside = _ROOT.parent / "shared" / "fhir-samples" / "synthea-r4"
    candidates = [beside, Path("/work/shared/fhir-samples/synthea-r4")]
    if os.environ.get("CONCIERGE_FHIR_SAMPLES"):
        candidates.insert(0, Path(os.environ["CONCIERGE_FHIR_SAMPLES"]))
    return next((c for c in candidates if c.is_dir()), beside)
