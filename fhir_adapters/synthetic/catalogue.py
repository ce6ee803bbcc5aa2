"""Code catalogues of the synthetic population.

Code systems: SNOMED CT (``http://snomed.info/sct``), ICD-10 (``http://hl7.org/fhir/sid/icd-10``),
LOINC (``http://loinc.org``), dm+d (``https://dmd.nhs.uk``), OPCS-4 (:data:`OPCS4`), UCUM units.
Prevalences are rough UK adult figures by age band; they shape a plausible population, they are
not epidemiology.
"""

from __future__ import annotations

from dataclasses import dataclass

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
DMD = "https://dmd.nhs.uk"
#: OPCS-4 has no HL7-registered URI; this is the one the product uses throughout.
OPCS4 = "http://www.datadictionary.nhs.uk/opcs-4"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


@dataclass(frozen=True)
class ConditionDef:
    key: str
    snomed: str
    icd10: str
    display: str
    #: prevalence by age band start (18, 40, 60, 75)
    prevalence: tuple[float, float, float, float]


CONDITIONS: tuple[ConditionDef, ...] = (
    ConditionDef("t2dm", "44054006", "E11.9", "Type 2 diabetes mellitus", (0.02, 0.06, 0.12, 0.16)),
    ConditionDef("htn", "38341003", "I10", "Essential hypertension", (0.03, 0.12, 0.30, 0.45)),
    ConditionDef(
        "ckd3", "433144002", "N18.3", "Chronic kidney disease stage 3", (0.002, 0.01, 0.06, 0.15)
    ),
    ConditionDef(
        "hf",
        "703272007",
        "I50.1",
        "Heart failure with reduced ejection fraction",
        (0.0005, 0.003, 0.015, 0.05),
    ),
    ConditionDef(
        "copd", "13645005", "J44.9", "Chronic obstructive lung disease", (0.002, 0.01, 0.04, 0.07)
    ),
    ConditionDef("asthma", "195967001", "J45.9", "Asthma", (0.07, 0.06, 0.06, 0.06)),
    ConditionDef("af", "49436004", "I48.9", "Atrial fibrillation", (0.001, 0.005, 0.03, 0.10)),
    ConditionDef("mi", "22298006", "I21.9", "Myocardial infarction", (0.0005, 0.005, 0.02, 0.04)),
    ConditionDef(
        "nsclc", "254637007", "C34.9", "Non-small cell lung cancer", (0.0001, 0.0005, 0.002, 0.004)
    ),
    ConditionDef(
        "breast", "254837009", "C50.9", "Malignant neoplasm of breast", (0.0005, 0.004, 0.01, 0.015)
    ),
    ConditionDef(
        "crc", "363406005", "C18.9", "Malignant neoplasm of colon", (0.0002, 0.001, 0.004, 0.008)
    ),
)
ONCOLOGY = ("nsclc", "breast", "crc")

# (key, dm+d code, display, conditions it treats, probability given the condition)
MEDICATIONS: tuple[tuple[str, str, str, tuple[str, ...], float], ...] = (
    ("metformin", "109081006", "Metformin", ("t2dm",), 0.8),
    ("gliclazide", "108781003", "Gliclazide", ("t2dm",), 0.2),
    ("insulin_glargine", "411529005", "Insulin glargine", ("t2dm",), 0.12),
    ("empagliflozin", "703894008", "Empagliflozin", ("t2dm", "hf"), 0.15),
    ("dapagliflozin", "703680003", "Dapagliflozin", ("t2dm", "hf", "ckd3"), 0.15),
    ("atorvastatin", "108600003", "Atorvastatin", ("t2dm", "mi", "htn"), 0.45),
    ("simvastatin", "96304005", "Simvastatin", ("htn",), 0.1),
    ("ramipril", "108575009", "Ramipril", ("htn", "hf", "ckd3"), 0.35),
    ("lisinopril", "108573002", "Lisinopril", ("htn",), 0.1),
    ("amlodipine", "108537001", "Amlodipine", ("htn",), 0.35),
    ("bisoprolol", "108579003", "Bisoprolol", ("hf", "af", "mi"), 0.6),
    ("furosemide", "108476002", "Furosemide", ("hf",), 0.6),
    ("sacubitril_valsartan", "777480008", "Sacubitril + valsartan", ("hf",), 0.35),
    ("salbutamol", "91143003", "Salbutamol", ("asthma", "copd"), 0.8),
    ("apixaban", "703907004", "Apixaban", ("af",), 0.7),
    ("osimertinib", "716125002", "Osimertinib", ("nsclc",), 0.15),
)


@dataclass(frozen=True)
class DeviceClass:
    key: str
    snomed: str
    display: str
    implant_opcs: str
    implant_snomed: str
    implant_display: str
    outcome_opcs: str
    outcome_snomed: str
    outcome_display: str
    outcome_icd10: str
    #: baseline probability of the class's outcome within the follow-up
    outcome_rate: float
    models: tuple[tuple[str, str], ...]  # (manufacturer, model)


DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass(
        "hip",
        "304120007",
        "Total hip replacement prosthesis",
        "W37.1",
        "52734007",
        "Total replacement of hip",
        "W37.3",
        "179344006",
        "Revision of total hip replacement",
        "T84.0",
        0.03,
        (
            ("Orthomedica", "Acetabulon X2"),
            ("Corin Ltd", "TriFit CF"),
            ("JRI Orthopaedics", "Furlong Evolution"),
            ("Stryker", "Exeter V40"),
        ),
    ),
    DeviceClass(
        "knee",
        "304121006",
        "Total knee replacement prosthesis",
        "W40.1",
        "609588000",
        "Total knee replacement",
        "W40.3",
        "443682002",
        "Revision of total knee replacement",
        "T84.0",
        0.03,
        (
            ("Zimmer Biomet", "NexGen LPS"),
            ("Smith+Nephew", "Legion PS"),
            ("DePuy Synthes", "Attune CR"),
        ),
    ),
    DeviceClass(
        "pacemaker",
        "14106009",
        "Cardiac pacemaker",
        "K60.1",
        "307280005",
        "Implantation of cardiac pacemaker",
        "K60.6",
        "233180008",
        "Revision of pacemaker lead",
        "T82.1",
        0.04,
        (
            ("Medtronic", "Azure XT DR"),
            ("Abbott", "Assurity MRI"),
            ("Boston Scientific", "Accolade MRI"),
        ),
    ),
    DeviceClass(
        "insulin_pump",
        "69805005",
        "Insulin pump",
        "X35.2",
        "225286007",
        "Insertion of subcutaneous insulin pump",
        "X35.2",
        "225286007",
        "Replacement of insulin pump",
        "T85.6",
        0.05,
        (("Medtronic", "MiniMed 780G"), ("Tandem", "t:slim X2"), ("Ypsomed", "mylife")),
    ),
)
DEFAULT_FAULTY_MODEL = "Acetabulon X2"

LABS = {
    "hba1c_mmol": (
        LOINC,
        "59261-8",
        "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol",
        "mmol/mol",
    ),
    "hba1c_pct": (LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%"),
    "egfr": (
        LOINC,
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted (MDRD)",
        "mL/min/{1.73_m2}",
    ),
    "ldl_mmol": (LOINC, "22748-8", "LDL Cholesterol [Moles/volume] in Serum or Plasma", "mmol/L"),
    "ldl_mg": (
        LOINC,
        "18262-6",
        "LDL Cholesterol [Mass/volume] in Serum or Plasma by Direct assay",
        "mg/dL",
    ),
    "chol": (LOINC, "14647-2", "Cholesterol [Moles/volume] in Serum or Plasma", "mmol/L"),
    "bmi": (LOINC, "39156-5", "Body mass index (BMI) [Ratio]", "kg/m2"),
}
BP_PANEL = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")
STAGE_GROUP = ("21908-9", "Stage group.clinical Cancer")
MARKERS = {
    "nsclc": [
        ("21665-5", "EGFR gene targeted mutation analysis in Blood or Tissue", 0.15),
        ("21702-6", "KRAS gene targeted mutation analysis in Blood or Tissue", 0.3),
    ],
    "breast": [("48676-1", "HER2 [Interpretation] in Tissue", 0.2)],
    "crc": [("21702-6", "KRAS gene targeted mutation analysis in Blood or Tissue", 0.4)],
}
DETECTED = (LOINC, "LA9633-4", "Present")
NOT_DETECTED = (LOINC, "LA9634-2", "Absent")
STAGES = ("I", "II", "IIIA", "IIIB", "IV")
