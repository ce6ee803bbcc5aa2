"""A deterministic synthetic UK-like population as FHIR R4, for demos, tests and benchmarks."""
