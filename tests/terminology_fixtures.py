"""The hand-made SNOMED CT releases and ValueSets of ``tests/fixtures`` (real RF2 format).

The 2025-04-01 release's disorders (``<`` is "is a"; 127013003 and 420279001 have two parents):

    64572001 Disease
    ├── 73211009 Diabetes mellitus
    │   ├── 46635009 Type 1
    │   ├── 44054006 Type 2 ── 313436004 without complication, 999001021000000105 in remission
    │   ├── 127013003 Disorder of kidney due to DM  (also < 90708001)
    │   │   └── 420279001 Renal disorder due to type 2 DM  (also < 44054006)
    │   └── 11687002 Gestational DM
    ├── 90708001 Kidney disease ── 127013003
    ├── 38341003 Hypertension
    └── 173300003 Disorder of pregnancy

The 2026-01-01 release moves 11687002 (gestational DM) from diabetes mellitus to disorder of
pregnancy. 190330002 is an inactive concept. Medicines: 109081006 (metformin product) >
325278007 (metformin 500 mg tablet) > 39113611000001102 (a dm+d AMP).
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_2025 = FIXTURES / "snomed" / "SnomedCT_UKClinicalRF2_PRODUCTION_20250401T000001Z"
RELEASE_2026 = FIXTURES / "snomed" / "SnomedCT_UKClinicalRF2_PRODUCTION_20260101T000001Z"
VALUESETS = FIXTURES / "valuesets"

VS_NOT_TYPE_1 = "https://example.org/fhir/ValueSet/diabetes-non-type-1"
VS_COMPLICATIONS = "https://example.org/fhir/ValueSet/diabetes-complications"
VS_HBA1C = "https://example.org/fhir/ValueSet/hba1c-tests"
VS_ECL = "https://example.org/fhir/ValueSet/diabetes-ecl"
VS_NESTED = "https://example.org/fhir/ValueSet/metabolic-kidney"
