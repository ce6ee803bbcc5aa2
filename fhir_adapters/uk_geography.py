"""Coarse geography: UK postcode area -> NHS region (England) or nation.

Only the postcode *area* (the leading letters) is ever read, so the region is derived without any
identifying part of the address reaching a fact. Areas that straddle two regions are assigned to
the region holding most of their population.
"""

from __future__ import annotations

import re

REGIONS: tuple[str, ...] = (
    "London",
    "South East",
    "South West",
    "East of England",
    "Midlands",
    "North East and Yorkshire",
    "North West",
    "Scotland",
    "Wales",
    "Northern Ireland",
)

_AREAS: dict[str, tuple[str, ...]] = {
    "London": (
        "E",
        "EC",
        "N",
        "NW",
        "SE",
        "SW",
        "W",
        "WC",
        "BR",
        "CR",
        "DA",
        "EN",
        "HA",
        "IG",
        "KT",
        "RM",
        "SM",
        "TW",
        "UB",
    ),
    "South East": ("BN", "CT", "GU", "ME", "MK", "OX", "PO", "RG", "RH", "SL", "SO", "TN", "HP"),
    "South West": ("BA", "BH", "BS", "DT", "EX", "GL", "PL", "SN", "SP", "TA", "TQ", "TR"),
    "East of England": ("AL", "CB", "CM", "CO", "IP", "LU", "NR", "PE", "SG", "SS", "WD"),
    "Midlands": ("B", "CV", "DE", "DY", "LE", "LN", "NG", "NN", "ST", "WS", "WV", "WR", "HR", "TF"),
    "North East and Yorkshire": (
        "BD",
        "DH",
        "DL",
        "DN",
        "HD",
        "HG",
        "HU",
        "HX",
        "LS",
        "NE",
        "S",
        "SR",
        "TS",
        "WF",
        "YO",
    ),
    "North West": (
        "BB",
        "BL",
        "CA",
        "CH",
        "CW",
        "FY",
        "L",
        "LA",
        "M",
        "OL",
        "PR",
        "SK",
        "WA",
        "WN",
    ),
    "Scotland": (
        "AB",
        "DD",
        "DG",
        "EH",
        "FK",
        "G",
        "HS",
        "IV",
        "KA",
        "KW",
        "KY",
        "ML",
        "PA",
        "PH",
        "TD",
        "ZE",
    ),
    "Wales": ("CF", "LD", "LL", "NP", "SA", "SY"),
    "Northern Ireland": ("BT",),
}

POSTCODE_AREA_REGION: dict[str, str] = {
    area: region for region, areas in _AREAS.items() for area in areas
}

UNKNOWN_REGION = "Unknown"

_AREA_RE = re.compile(r"^\s*([A-Za-z]{1,2})[0-9]")


def postcode_area(postcode: str) -> str | None:
    match = _AREA_RE.match(postcode)
    return match.group(1).upper() if match else None


def region_for_postcode(postcode: str | None) -> str:
    """The NHS region or nation of a UK postcode, or ``Unknown`` for anything else."""
    if not postcode:
        return UNKNOWN_REGION
    area = postcode_area(postcode)
    if area is None:
        return UNKNOWN_REGION
    return POSTCODE_AREA_REGION.get(area, UNKNOWN_REGION)
