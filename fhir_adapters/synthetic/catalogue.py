"""Code catalogues of the synthetic population.

Code systems (URIs as written into the resources):

* SNOMED CT ``http://snomed.info/sct``: conditions, procedures, device types, roles.
* ICD-10 ``http://hl7.org/fhir/sid/icd-10``: conditions and device complications.
* LOINC ``http://loinc.org``: laboratory tests, vital signs, staging, markers, answers.
* UCUM ``http://unitsofmeasure.org``: every ``valueQuantity``.
* dm+d ``https://dmd.nhs.uk``: medicines (VTM-level concepts; dm+d ids are SNOMED ids).
* OPCS-4 :data:`OPCS4` (``https://fhir.hl7.org.uk/Id/opcs-4``): procedures. OPCS-4 has no
  HL7-registered URI; this UK Core style identifier is the one the product uses throughout.
* ODS ``https://fhir.nhs.uk/Id/ods-organization-code``, NHS number
  ``https://fhir.nhs.uk/Id/nhs-number``, GMC/GMP/NMC numbers ``https://fhir.hl7.org.uk/Id/...``.

Prevalences are rough UK adult figures (QOF-like) by age band; they shape a plausible population,
they are not epidemiology. Codes were chosen from the public releases by hand: check them against
the current TRUD/LOINC releases before using the population to validate a real code list.
"""

from __future__ import annotations

from dataclasses import dataclass

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
DMD = "https://dmd.nhs.uk"
#: OPCS-4 has no HL7-registered URI; this is the one the product uses throughout.
OPCS4 = "https://fhir.hl7.org.uk/Id/opcs-4"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
AE_SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"
AE_CATEGORY = "http://terminology.hl7.org/CodeSystem/adverse-event-category"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
AJCC = "http://cancerstaging.org"
NHS_NUMBER = "https://fhir.nhs.uk/Id/nhs-number"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
ORG_ROLE = "https://fhir.nhs.uk/CodeSystem/organisation-role"
GMC = "https://fhir.hl7.org.uk/Id/gmc-number"
GMP = "https://fhir.hl7.org.uk/Id/gmp-number"
NMC = "https://fhir.hl7.org.uk/Id/nmc-number"
NATIONAL_DATA_OPT_OUT = "https://digital.nhs.uk/services/national-data-opt-out"

Code = tuple[str, str]  # (code, display)


@dataclass(frozen=True)
class ConditionDef:
    key: str
    snomed: str
    icd10: str
    display: str
    #: prevalence by adult age band starting at 18, 40, 60, 75
    prevalence: tuple[float, float, float, float]


CONDITIONS: tuple[ConditionDef, ...] = (
    ConditionDef("t2dm", "44054006", "E11.9", "Type 2 diabetes mellitus", (0.02, 0.06, 0.12, 0.16)),
    ConditionDef("htn", "38341003", "I10", "Essential hypertension", (0.03, 0.10, 0.28, 0.40)),
    # Chronic kidney disease: stage 3 here; 4 and 5 are drawn from it (CKD_STAGES).
    ConditionDef(
        "ckd", "433144002", "N18.3", "Chronic kidney disease stage 3", (0.003, 0.015, 0.07, 0.18)
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

#: CKD stage -> (SNOMED, ICD-10, display, share of CKD patients, eGFR mean, eGFR sd)
CKD_STAGES: dict[str, tuple[str, str, str, float, float, float]] = {
    "3": ("433144002", "N18.3", "Chronic kidney disease stage 3", 0.88, 44.0, 8.0),
    "4": ("431857002", "N18.4", "Chronic kidney disease stage 4", 0.09, 22.0, 4.0),
    "5": ("433146000", "N18.5", "Chronic kidney disease stage 5", 0.03, 11.0, 2.5),
}


@dataclass(frozen=True)
class MedicationDef:
    key: str
    dmd: str
    display: str
    dose: str
    #: conditions it treats (any one is enough) and the probability given one of them
    treats: tuple[str, ...]
    probability: float


MEDICATIONS: tuple[MedicationDef, ...] = (
    MedicationDef("metformin", "109081006", "Metformin", "500 mg twice daily", ("t2dm",), 0.8),
    MedicationDef("gliclazide", "108781003", "Gliclazide", "80 mg once daily", ("t2dm",), 0.2),
    MedicationDef(
        "insulin_glargine", "411529005", "Insulin glargine", "10 units at night", ("t2dm",), 0.12
    ),
    MedicationDef(
        "empagliflozin", "703894008", "Empagliflozin", "10 mg once daily", ("t2dm", "hf"), 0.15
    ),
    MedicationDef(
        "dapagliflozin",
        "703680003",
        "Dapagliflozin",
        "10 mg once daily",
        ("t2dm", "hf", "ckd"),
        0.15,
    ),
    MedicationDef(
        "atorvastatin", "108600003", "Atorvastatin", "20 mg at night", ("t2dm", "mi", "htn"), 0.45
    ),
    MedicationDef("simvastatin", "96304005", "Simvastatin", "40 mg at night", ("htn",), 0.1),
    MedicationDef(
        "ramipril", "108575009", "Ramipril", "5 mg once daily", ("htn", "hf", "ckd"), 0.35
    ),
    MedicationDef("lisinopril", "108573002", "Lisinopril", "10 mg once daily", ("htn",), 0.1),
    MedicationDef("amlodipine", "108537001", "Amlodipine", "5 mg once daily", ("htn",), 0.35),
    MedicationDef(
        "bisoprolol", "108579003", "Bisoprolol", "2.5 mg once daily", ("hf", "af", "mi"), 0.6
    ),
    MedicationDef("furosemide", "108476002", "Furosemide", "40 mg in the morning", ("hf",), 0.6),
    MedicationDef(
        "sacubitril_valsartan",
        "777480008",
        "Sacubitril + valsartan",
        "49 mg/51 mg twice daily",
        ("hf",),
        0.35,
    ),
    MedicationDef(
        "salbutamol",
        "91143003",
        "Salbutamol",
        "100 micrograms inhaled as required",
        ("asthma", "copd"),
        0.8,
    ),
    MedicationDef("apixaban", "703907004", "Apixaban", "5 mg twice daily", ("af",), 0.7),
)

#: Oncology medicines, prescribed by marker status: (key, dm+d, display, dose).
#: Pembrolizumab's id is the SNOMED substance concept; osimertinib's is UNVERIFIED (check TRUD).
OSIMERTINIB = ("osimertinib", "720468002", "Osimertinib", "80 mg once daily")
PEMBROLIZUMAB = ("pembrolizumab", "716125002", "Pembrolizumab", "200 mg every 3 weeks IV")


@dataclass(frozen=True)
class ProcedureDef:
    opcs: str
    snomed: str
    display: str


#: Surgery and interventions by condition: (condition, probability, procedure)
CONDITION_PROCEDURES: tuple[tuple[str, float, ProcedureDef], ...] = (
    ("nsclc", 0.35, ProcedureDef("E54.9", "173171007", "Lobectomy of lung")),
    ("breast", 0.6, ProcedureDef("B28.9", "392021009", "Lumpectomy of breast")),
    ("crc", 0.6, ProcedureDef("H07.9", "82619000", "Right hemicolectomy")),
    ("mi", 0.5, ProcedureDef("K75.9", "415070008", "Percutaneous coronary intervention")),
)


@dataclass(frozen=True)
class OutcomeDef:
    key: str
    icd10: str
    display: str
    #: share of this class's outcomes that are of this kind
    weight: float


@dataclass(frozen=True)
class DeviceClass:
    key: str
    snomed: str
    display: str
    implant: ProcedureDef
    #: the corrective procedure after an outcome (revision, lead revision, replacement)
    revision: ProcedureDef
    outcomes: tuple[OutcomeDef, ...]
    #: baseline probability of an outcome within the follow-up
    outcome_rate: float
    models: tuple[tuple[str, str, str], ...]  # (manufacturer, model, catalogue number)


_JOINT_OUTCOMES = (
    OutcomeDef("loosening", "T84.0", "Mechanical complication of internal joint prosthesis", 0.7),
    OutcomeDef("infection", "T84.5", "Infection due to internal joint prosthesis", 0.3),
)

DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass(
        "hip",
        "304120007",
        "Total hip replacement prosthesis",
        ProcedureDef("W37.1", "52734007", "Primary total prosthetic replacement of hip joint"),
        ProcedureDef("W37.3", "179344006", "Revision of total prosthetic replacement of hip joint"),
        _JOINT_OUTCOMES,
        0.03,
        (
            ("Orthomedica", "Acetabulon X2", "OM-AX2-52"),
            ("Corin Ltd", "TriFit CF", "CO-TF-CF"),
            ("JRI Orthopaedics", "Furlong Evolution", "JRI-FE-01"),
            ("Stryker", "Exeter V40", "ST-EX-V40"),
        ),
    ),
    DeviceClass(
        "knee",
        "304121006",
        "Total knee replacement prosthesis",
        ProcedureDef("W40.1", "609588000", "Primary total prosthetic replacement of knee joint"),
        ProcedureDef(
            "W40.3", "443682002", "Revision of total prosthetic replacement of knee joint"
        ),
        _JOINT_OUTCOMES,
        0.03,
        (
            ("Zimmer Biomet", "NexGen LPS", "ZB-NG-LPS"),
            ("Smith+Nephew", "Legion PS", "SN-LG-PS"),
            ("DePuy Synthes", "Attune CR", "DS-AT-CR"),
        ),
    ),
    DeviceClass(
        "pacemaker",
        "14106009",
        "Cardiac pacemaker",
        ProcedureDef("K60.1", "307280005", "Implantation of cardiac pacemaker"),
        ProcedureDef("K60.6", "233180008", "Revision of cardiac pacemaker lead"),
        (
            OutcomeDef("lead_failure", "T82.1", "Mechanical complication of cardiac device", 0.75),
            OutcomeDef("pocket_infection", "T82.7", "Infection due to cardiac device", 0.25),
        ),
        0.04,
        (
            ("Medtronic", "Azure XT DR", "W1DR01"),
            ("Abbott", "Assurity MRI", "PM2272"),
            ("Boston Scientific", "Accolade MRI", "L331"),
            ("Biotronik", "Edora 8 DR-T", "BT-E8DRT"),
        ),
    ),
    DeviceClass(
        "insulin_pump",
        "69805005",
        "Insulin pump",
        ProcedureDef("X50.9", "225286007", "Initiation of insulin pump therapy"),
        ProcedureDef("X50.9", "225286007", "Replacement of insulin pump"),
        (
            OutcomeDef("malfunction", "T85.6", "Mechanical complication of insulin pump", 0.8),
            OutcomeDef("site_infection", "T85.7", "Infusion site infection", 0.2),
        ),
        0.05,
        (
            ("Medtronic", "MiniMed 780G", "MMT-1886"),
            ("Tandem", "t:slim X2", "TD-1004000"),
            ("Ypsomed", "mylife YpsoPump", "YP-700004"),
        ),
    ),
)
DEFAULT_FAULTY_MODEL = "Acetabulon X2"

#: key -> (LOINC, display, UCUM unit, low, high): H/L outside [low, high], N inside
LABS: dict[str, tuple[str, str, str, float | None, float | None]] = {
    "hba1c_mmol": (
        "59261-8",
        "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol",
        "mmol/mol",
        None,
        47.0,
    ),
    "hba1c_pct": ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", None, 6.4),
    "egfr_mdrd": (
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma "
        "by Creatinine-based formula (MDRD)",
        "mL/min/{1.73_m2}",
        60.0,
        None,
    ),
    "egfr_ckdepi": (
        "62238-1",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or "
        "Blood by Creatinine-based formula (CKD-EPI)",
        "mL/min/{1.73_m2}",
        60.0,
        None,
    ),
    "ldl_mmol": (
        "22748-8",
        "Cholesterol in LDL [Moles/volume] in Serum or Plasma",
        "mmol/L",
        None,
        3.0,
    ),
    "ldl_mg": (
        "18262-6",
        "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
        "mg/dL",
        None,
        116.0,
    ),
    "chol": ("14647-2", "Cholesterol [Moles/volume] in Serum or Plasma", "mmol/L", None, 5.0),
    "bmi": ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 18.5, 30.0),
}
BP_PANEL: Code = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC: Code = ("8480-6", "Systolic blood pressure")
DIASTOLIC: Code = ("8462-4", "Diastolic blood pressure")
STAGE_GROUP: Code = ("21908-9", "Stage group.clinical Cancer")
#: condition -> [(marker key, LOINC, display, probability positive)]
MARKERS: dict[str, list[tuple[str, str, str, float]]] = {
    "nsclc": [
        ("egfr", "21665-5", "EGFR gene targeted mutation analysis in Blood or Tissue", 0.15),
        ("kras", "21702-6", "KRAS gene targeted mutation analysis in Blood or Tissue", 0.3),
    ],
    "breast": [("her2", "48676-1", "HER2 [Interpretation] in Tissue", 0.2)],
    "crc": [("kras", "21702-6", "KRAS gene targeted mutation analysis in Blood or Tissue", 0.4)],
}
#: LOINC answers: mutations are detected/not detected, HER2 positive/negative
DETECTED: Code = ("LA9633-4", "Present")
NOT_DETECTED: Code = ("LA9634-2", "Absent")
POSITIVE: Code = ("LA6576-8", "Positive")
NEGATIVE: Code = ("LA6577-6", "Negative")
STAGES = ("I", "II", "IIIA", "IIIB", "IV")

#: UK post towns by postcode area (covers every area in fhir_adapters.uk_geography).
POST_TOWNS: dict[str, str] = {
    "E": "London", "EC": "London", "N": "London", "NW": "London", "SE": "London",
    "SW": "London", "W": "London", "WC": "London", "BR": "Bromley", "CR": "Croydon",
    "DA": "Dartford", "EN": "Enfield", "HA": "Harrow", "IG": "Ilford",
    "KT": "Kingston upon Thames", "RM": "Romford", "SM": "Sutton", "TW": "Twickenham",
    "UB": "Southall", "BN": "Brighton", "CT": "Canterbury", "GU": "Guildford",
    "ME": "Rochester", "MK": "Milton Keynes", "OX": "Oxford", "PO": "Portsmouth",
    "RG": "Reading", "RH": "Redhill", "SL": "Slough", "SO": "Southampton",
    "TN": "Tonbridge", "HP": "Hemel Hempstead", "BA": "Bath", "BH": "Bournemouth",
    "BS": "Bristol", "DT": "Dorchester", "EX": "Exeter", "GL": "Gloucester",
    "PL": "Plymouth", "SN": "Swindon", "SP": "Salisbury", "TA": "Taunton",
    "TQ": "Torquay", "TR": "Truro", "AL": "St Albans", "CB": "Cambridge",
    "CM": "Chelmsford", "CO": "Colchester", "IP": "Ipswich", "LU": "Luton",
    "NR": "Norwich", "PE": "Peterborough", "SG": "Stevenage", "SS": "Southend-on-Sea",
    "WD": "Watford", "B": "Birmingham", "CV": "Coventry", "DE": "Derby", "DY": "Dudley",
    "LE": "Leicester", "LN": "Lincoln", "NG": "Nottingham", "NN": "Northampton",
    "ST": "Stoke-on-Trent", "WS": "Walsall", "WV": "Wolverhampton", "WR": "Worcester",
    "HR": "Hereford", "TF": "Telford", "BD": "Bradford", "DH": "Durham",
    "DL": "Darlington", "DN": "Doncaster", "HD": "Huddersfield", "HG": "Harrogate",
    "HU": "Hull", "HX": "Halifax", "LS": "Leeds", "NE": "Newcastle upon Tyne",
    "S": "Sheffield", "SR": "Sunderland", "TS": "Middlesbrough", "WF": "Wakefield",
    "YO": "York", "BB": "Blackburn", "BL": "Bolton", "CA": "Carlisle", "CH": "Chester",
    "CW": "Crewe", "FY": "Blackpool", "L": "Liverpool", "LA": "Lancaster",
    "M": "Manchester", "OL": "Oldham", "PR": "Preston", "SK": "Stockport",
    "WA": "Warrington", "WN": "Wigan", "AB": "Aberdeen", "DD": "Dundee",
    "DG": "Dumfries", "EH": "Edinburgh", "FK": "Falkirk", "G": "Glasgow",
    "HS": "Stornoway", "IV": "Inverness", "KA": "Kilmarnock", "KW": "Kirkwall",
    "KY": "Kirkcaldy", "ML": "Motherwell", "PA": "Paisley", "PH": "Perth",
    "TD": "Galashiels", "ZE": "Lerwick", "CF": "Cardiff", "LD": "Llandrindod Wells",
    "LL": "Llandudno", "NP": "Newport", "SA": "Swansea", "SY": "Shrewsbury",
    "BT": "Belfast",
}  # fmt: skip

#: Approximate population share of each region (sites are spread accordingly).
REGION_WEIGHTS: dict[str, float] = {
    "London": 0.135,
    "South East": 0.14,
    "South West": 0.085,
    "East of England": 0.095,
    "Midlands": 0.16,
    "North East and Yorkshire": 0.125,
    "North West": 0.11,
    "Scotland": 0.08,
    "Wales": 0.047,
    "Northern Ireland": 0.028,
}
