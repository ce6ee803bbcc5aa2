"""UCUM units for lab values and vital signs: parsing, conversion, analyte-specific conversions.

Eligibility criteria state thresholds in one unit (``LDL cholesterol >= 3.0 mmol/L``) while
observations arrive in others (``mg/dL``). This module turns a pair of unit strings (and, where
needed, the analyte) into an affine map ``to = from * scale + offset``. The vectorised engine
asks :func:`affine` once per distinct source unit and applies the pair to a whole column;
:func:`convert` is the scalar form that raises instead of returning ``None``.

Supported UCUM subset (case-sensitive "c/s" symbols)
----------------------------------------------------
Grammar, as in the UCUM specification: an expression is a term, optionally led by ``/``
(``/min`` = 1/min); a term is components joined by ``.`` (multiplication) and ``/``
(division), evaluated left to right (``mL/min/{1.73_m2}`` = (mL/min)/{1.73_m2}); a component
is a simple unit with an optional integer exponent (``m2``, ``s-1``, ``cm3``, ``10*9``), a
positive integer factor (``24`` in ``mg/(24.h)``), a parenthesised term, or an annotation.
Annotations ``{...}`` are dimensionless with factor 1, standing alone (``{cells}/uL``) or after
a unit (``mL{total}``), except ``{1.73_m2}`` (see "Deviations"). The empty string and ``1`` are
dimensionless 1. Whitespace is an error.

Prefixes (metric atoms only): Y Z E P T G M k h da d c m u n p f a z y; ``u`` is micro.

Atoms (``*`` = takes prefixes):

* base: ``m* g* s* mol* K* A* cd* rad*``, ``eq*`` (equivalents), ``[iU]*`` (international unit)
* dimensionless: ``10*`` and ``10^`` (the number ten: ``10*9/L``), ``%`` (1e-2), ``[ppth]``,
  ``[ppm]``, ``[ppb]``, ``[pptr]``, ``sr*`` (rad2)
* volume, mass: ``L* l*`` (dm3), ``t*`` (1000 kg)
* time: ``min h d wk``, ``a`` = ``a_j`` (mean Julian year, 365.25 d), ``mo`` = ``mo_j``
  (a_j/12); time atoms other than ``s`` take no prefix
* imperial: ``[in_i]`` (2.54 cm), ``[ft_i]``, ``[yd_i]``, ``[mi_i]``, ``[lb_av]``
  (0.45359237 kg), ``[oz_av]`` (1/16 lb), ``[stone_av]`` (14 lb)
* derived SI: ``Hz* N* Pa* J* W* C* V* Ohm*``, ``bar*`` (1e5 Pa), ``atm`` (101325 Pa),
  ``m[Hg]*`` (so ``mm[Hg]``), ``m[H2O]*`` (so ``cm[H2O]``), ``cal*`` (4.184 J, so ``kcal``),
  ``[Cal]`` (nutrition Calorie = kcal)
* enzyme activity: ``U*`` (umol/min), ``kat*`` (mol/s); ``[IU]*`` (= ``[iU]``)
* temperature with an offset (affine): ``Cel`` (degree Celsius) and ``[degF]``. They may stand
  only alone (optionally annotated): no prefix, exponent or combination with other units.

Dimension model
---------------
A :class:`Unit` is a factor, a dimension vector and an offset: a value ``v`` in the unit is
``v * factor + offset`` in the coherent base units ``m, g, s, mol, K, A, cd, rad, eq, [iU]``
(the order of :data:`DIMENSIONS`). Two units are commensurable when their vectors are equal.
Unlike UCUM, which defines ``mol`` as the number 6.0221367e23, amount of substance is a
dimension of its own, so ``mg/dL`` and ``mmol/L`` convert only through an analyte's molar mass.
``eq`` is a separate, mol-like dimension too (``mmol`` <-> ``meq`` needs the valence, which is
not modelled), and ``[iU]``/``[IU]`` form an arbitrary dimension: convertible only to
themselves, with prefixes (``m[IU]/mL`` -> ``[IU]/L``). Like UCUM, ``rad`` is a dimension.
``per_body_surface`` is the normalisation to 1.73 m2 of body surface (``{1.73_m2}``).

Exact arithmetic: factors are kept as :class:`fractions.Fraction` from decimal constants, so a
scale is the correctly rounded float of the exact ratio (no drift from chains of float
products); :attr:`Unit.factor` is its float rendering.

Deviations and aliases
----------------------
In UCUM an annotation never changes a unit, so ``mL/min/{1.73_m2}`` (an eGFR, normalised to a
body surface of 1.73 m2) would equal ``mL/min`` (a clearance). They are different quantities:
one converts to the other only through the patient's own body surface area, which a result does
not carry. Comparing 20 mL/min with "eGFR < 30 mL/min/{1.73_m2}" would be a silent wrong
answer, so the annotation ``{1.73_m2}`` (also written ``{1.73m2}``, ``{1.73 m2}``) counts as
one power of its own dimension, ``per_body_surface``, in the divisor: ``L/h/{1.73_m2}``
converts to ``mL/min/{1.73_m2}``, never to ``mL/min``. Every other annotation is ignored.

``m[Hg]`` is the conventional 13.5951 g/cm3 x 9.80665 m/s2 x 1 m = 133.322387415 kPa (UCUM's
table lists it rounded to 133.3220 kPa). Identical unit strings (after trimming and alias
mapping) always convert with ``(1.0, 0.0)`` even when they do not parse, so unknown local units
still compare with themselves. A few common non-UCUM spellings are accepted:

* whole expressions (:data:`EXPRESSION_ALIASES`): ``mg/dl`` -> ``mg/dL``,
  ``mmol/l`` -> ``mmol/L``, ``kg/m^2`` -> ``kg/m2``, ``bpm`` and ``beats/min`` -> ``/min``,
  ``mL/min/1.73m2`` (and ``ml``, ``1.73 m2``, ``1.73m^2`` spellings) -> ``mL/min/{1.73_m2}``;
* unit symbols inside any expression (:data:`SYMBOL_ALIASES`): ``IU`` -> ``[IU]`` (prefixable:
  ``mIU/mL``), ``Eq`` -> ``eq`` (``mEq/L``), ``mmHg`` -> ``mm[Hg]``, ``cmH2O`` -> ``cm[H2O]``,
  ``degC`` -> ``Cel``, ``degF`` -> ``[degF]``.

Analyte-specific conversions
----------------------------
Mass <-> substance (e.g. ``mg/dL`` <-> ``mmol/L``) uses the molar mass in
:data:`MOLAR_MASS_G_PER_MOL` when the two units differ by exactly one power of mass traded for
one power of substance. Constants are the conventional clinical-chemistry molar masses:
cholesterol (C27H46O) 386.65 g/mol, also for LDL and HDL cholesterol; triglycerides 885.7 g/mol
(as triolein, the convention behind the 0.01129 mg/dL -> mmol/L factor); glucose (C6H12O6)
180.156 g/mol; creatinine (C4H7N3O) 113.12 g/mol; urea (CH4N2O) 60.06 g/mol; urea nitrogen
28.014 g/mol (the two N atoms of one urea molecule, so BUN in mg/dL x 0.357 = urea in mmol/L).

HbA1c is special. NGSP/DCCT percent (``%``) and IFCC ``mmol/mol`` are both dimensionless in
UCUM, so a plain conversion would give 6.5 % = 65 mmol/mol, which is wrong: they are different
measurement scales related by the IFCC-NGSP master equation (Hoelzel et al., Clin Chem
2004;50:166-174)::

    NGSP(%) = 0.09148 * IFCC(mmol/mol) + 2.152      IFCC = (NGSP - 2.152) / 0.09148

With ``analyte="hba1c"``, a dimensionless unit that mentions ``mol`` (``mmol/mol``,
``mol/mol``) is on the IFCC scale and any other dimensionless unit (``%``, ``1``) is on the NGSP
scale; between the two scales the master equation applies (6.5 % -> 47.5 mmol/mol), within one
scale plain UCUM scaling does. Without the analyte, ``%`` -> ``mmol/mol`` is the plain UCUM
ratio, so callers must pass the analyte for HbA1c (:func:`analyte_for_loinc` gives it).

:data:`ANALYTE_BY_LOINC` maps LOINC codes to analytes. LOINC 3094-0 (urea nitrogen, mass) and
14937-7 (urea nitrogen, moles) map to ``urea_nitrogen``: a criterion "BUN <= 20 mg/dL" must read
7 mmol/L of urea nitrogen as 19.6 mg/dL, not as 42 mg/dL of urea. 22664-7 (urea, moles) maps to
``urea``.

Units of criteria
-----------------
:data:`UNIT_BY_LOINC` gives the UCUM unit LOINC reports each known code in; :func:`suits` says
whether a criterion's unit can be compared with that code's results (it converts from the
code's unit, for the code's analyte). Criteria use it to refuse a unit of the wrong kind
(``kg`` for HbA1c) when a question is asked, instead of answering UNKNOWN for everyone.

Why a module of our own
-----------------------
The Python UCUM packages were weighed: ``ucumvert`` (0.3, a lark grammar of full UCUM mapped
onto ``pint``) drops every annotation, so it has the eGFR defect above; ``pint`` treats
``eq`` as ``mol`` (so ``mmol`` <-> ``meq`` would convert 1:1 whatever the valence), converts in
floats and knows neither the HbA1c master equation nor molar masses; and the two add two
dependencies to answer what this module answers exactly (fractions), for the subset of UCUM
that lab results use, tested against UCUM's definitions in ``tests/unit/feasibility/test_units.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from types import MappingProxyType
from typing import Final, NoReturn

__all__ = [
    "ANALYTES",
    "ANALYTE_BY_LOINC",
    "DIMENSIONS",
    "EXPRESSION_ALIASES",
    "MOLAR_MASS_G_PER_MOL",
    "SYMBOL_ALIASES",
    "UNIT_BY_LOINC",
    "IncommensurableUnits",
    "Unit",
    "UnitError",
    "affine",
    "analyte_for_loinc",
    "commensurable",
    "convert",
    "parse",
    "suits",
]


class UnitError(ValueError):
    """A unit expression that is not in the supported UCUM subset."""


class IncommensurableUnits(ValueError):
    """Two units (for the given analyte) with no conversion between them."""


#: Names of the dimension vector's positions, and the base unit of each.
DIMENSIONS: Final[tuple[str, ...]] = (
    "length",
    "mass",
    "time",
    "substance",
    "temperature",
    "current",
    "luminosity",
    "angle",
    "equivalents",
    "international_units",
    "per_body_surface",
)
_BASE_SYMBOLS: Final = ("m", "g", "s", "mol", "K", "A", "cd", "rad", "eq", "[iU]", "{1.73_m2}")
_MASS: Final = 1
_SUBSTANCE: Final = 3
_PER_BODY_SURFACE: Final = 10
_ZERO_DIMS: Final[tuple[int, ...]] = (0,) * len(DIMENSIONS)
_MAX_EXPONENT: Final = 99


@dataclass(frozen=True, slots=True)
class Unit:
    """A parsed unit: a value ``v`` in it is ``v * factor + offset`` in the base units."""

    factor: float
    dims: tuple[int, ...]
    offset: float = 0.0

    @property
    def is_affine(self) -> bool:
        """True for units with an offset from their base unit (``Cel``, ``[degF]``)."""
        return self.offset != 0.0


@dataclass(frozen=True, slots=True)
class _Exact:
    """Exact form of a parsed unit or atom, with what parsing needs to know about it."""

    factor: Fraction
    dims: tuple[int, ...]
    #: offset to the base unit, only for a lone affine atom (Cel, [degF])
    offset: Fraction | None = None
    #: some atom in the expression has a substance dimension (tells HbA1c IFCC from NGSP)
    molar: bool = False
    #: atom takes prefixes (meaningful for atoms only)
    metric: bool = False

    def times(self, other: _Exact, sign: int) -> _Exact:
        return _Exact(
            self.factor * other.factor**sign,
            tuple(a + sign * b for a, b in zip(self.dims, other.dims, strict=True)),
            molar=self.molar or other.molar,
        )

    def power(self, exponent: int) -> _Exact:
        if exponent == 1:
            return self
        return _Exact(
            self.factor**exponent,
            tuple(d * exponent for d in self.dims),
            molar=self.molar,
        )


_ONE: Final = _Exact(Fraction(1), _ZERO_DIMS)
#: "per 1.73 m2 of body surface": a dimension of its own (see "Deviations" in the docstring)
_PER_1_73_M2: Final = _Exact(
    Fraction(1), tuple(int(i == _PER_BODY_SURFACE) for i in range(len(DIMENSIONS)))
)
#: annotation texts (without spaces and underscores, lower case) that name it
_BODY_SURFACE_ANNOTATIONS: Final = frozenset({"1.73m2", "1.73m^2", "1.73sqm"})

_PREFIXES: Final[Mapping[str, Fraction]] = MappingProxyType(
    {
        "Y": Fraction(10) ** 24,
        "Z": Fraction(10) ** 21,
        "E": Fraction(10) ** 18,
        "P": Fraction(10) ** 15,
        "T": Fraction(10) ** 12,
        "G": Fraction(10) ** 9,
        "M": Fraction(10) ** 6,
        "k": Fraction(10) ** 3,
        "h": Fraction(10) ** 2,
        "da": Fraction(10),
        "d": Fraction(10) ** -1,
        "c": Fraction(10) ** -2,
        "m": Fraction(10) ** -3,
        "u": Fraction(10) ** -6,
        "n": Fraction(10) ** -9,
        "p": Fraction(10) ** -12,
        "f": Fraction(10) ** -15,
        "a": Fraction(10) ** -18,
        "z": Fraction(10) ** -21,
        "y": Fraction(10) ** -24,
    }
)
#: longest first, so "da" is tried before "d"
_PREFIX_ORDER: Final = tuple(sorted(_PREFIXES, key=len, reverse=True))

#: Whole-expression spellings seen in lab feeds, mapped to UCUM before parsing.
EXPRESSION_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "mg/dl": "mg/dL",
        "mmol/l": "mmol/L",
        "kg/m^2": "kg/m2",
        "bpm": "/min",
        "beats/min": "/min",
        "mL/min/1.73m2": "mL/min/{1.73_m2}",
        "ml/min/1.73m2": "mL/min/{1.73_m2}",
        "mL/min/1.73 m2": "mL/min/{1.73_m2}",
        "ml/min/1.73 m2": "mL/min/{1.73_m2}",
        "mL/min/1.73m^2": "mL/min/{1.73_m2}",
        "ml/min/1.73m^2": "mL/min/{1.73_m2}",
    }
)
#: Non-UCUM unit symbols accepted inside any expression. Targets that are metric atoms
#: (``[IU]``, ``eq``) take prefixes through the alias too (``mIU``, ``mEq``).
SYMBOL_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "IU": "[IU]",
        "Eq": "eq",
        "mmHg": "mm[Hg]",
        "cmH2O": "cm[H2O]",
        "degC": "Cel",
        "degF": "[degF]",
    }
)

_INTEGER = re.compile(r"[0-9]+")
_WITH_EXPONENT = re.compile(r"(?P<symbol>.*?)(?P<exponent>[+-]?[0-9]+)")
_DELIMITERS: Final = frozenset("./(){}")


class _Parser:
    """Recursive descent over one expression (see the module docstring for the grammar)."""

    def __init__(
        self,
        text: str,
        original: str,
        atoms: Mapping[str, _Exact],
        aliases: Mapping[str, str],
    ) -> None:
        self.text = text
        self.original = original
        self.atoms = atoms
        self.aliases = aliases
        self.pos = 0

    def fail(self, detail: str, pos: int) -> NoReturn:
        shown = repr(self.original)
        if self.text != self.original:
            shown += f" (read as {self.text!r})"
        raise UnitError(f"cannot parse unit {shown}: {detail} at position {pos}")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def parse(self) -> _Exact:
        if not self.text:
            return _ONE
        if self.peek() == "/":
            self.pos += 1
            start = self.pos
            inverted = self.term()
            if inverted.offset is not None:
                self.fail("a unit with an offset (Cel, [degF]) cannot be inverted", start)
            result = _ONE.times(inverted, -1)
        else:
            result = self.term()
        if self.pos < len(self.text):
            self.fail(f"unexpected {self.text[self.pos]!r}", self.pos)
        return result

    def term(self) -> _Exact:
        left = self.component()
        while (op := self.peek()) is not None and op in "./":
            op_pos = self.pos
            self.pos += 1
            right = self.component()
            if left.offset is not None or right.offset is not None:
                self.fail(
                    "a unit with an offset (Cel, [degF]) cannot be combined with other units",
                    op_pos,
                )
            left = left.times(right, 1 if op == "." else -1)
        return left

    def component(self) -> _Exact:
        char = self.peek()
        if char is None:
            self.fail("expected a unit but the expression ended", self.pos)
        if char == "(":
            open_pos = self.pos
            self.pos += 1
            inner = self.term()
            if self.peek() != ")":
                self.fail("unclosed '('", open_pos)
            self.pos += 1
            return self.annotated(inner)
        if char == "{":
            return self.annotation()
        if char in _DELIMITERS:
            self.fail(f"expected a unit, found {char!r}", self.pos)
        start = self.pos
        symbol = self.symbol()
        return self.annotated(self.simple_unit(symbol, start))

    def symbol(self) -> str:
        start = self.pos
        depth = 0
        bracket_pos = start
        while (char := self.peek()) is not None:
            if char.isspace():
                self.fail("whitespace is not allowed", self.pos)
            if char == "[":
                if depth == 0:
                    bracket_pos = self.pos
                depth += 1
            elif char == "]":
                if depth == 0:
                    self.fail("unmatched ']'", self.pos)
                depth -= 1
            elif depth == 0 and char in _DELIMITERS:
                break
            self.pos += 1
        if depth:
            self.fail("unclosed '['", bracket_pos)
        return self.text[start : self.pos]

    def annotation(self) -> _Exact:
        """The annotation at the cursor: dimensionless 1, except a body-surface normalisation
        (see "Deviations" in the module docstring)."""
        start = self.pos
        self.pos += 1
        while (char := self.peek()) != "}":
            if char is None:
                self.fail("unclosed '{'", start)
            if char == "{":
                self.fail("'{' inside an annotation", self.pos)
            self.pos += 1
        self.pos += 1
        text = re.sub(r"[\s_]", "", self.text[start + 1 : self.pos - 1]).lower()
        return _PER_1_73_M2 if text in _BODY_SURFACE_ANNOTATIONS else _ONE

    def annotated(self, unit: _Exact) -> _Exact:
        """``unit`` with the annotation that may follow it."""
        if self.peek() != "{":
            return unit
        start = self.pos
        note = self.annotation()
        if note is _ONE:
            return unit
        if unit.offset is not None:
            self.fail("a unit with an offset cannot be normalised to body surface", start)
        return unit.times(note, 1)

    def simple_unit(self, symbol: str, pos: int) -> _Exact:
        if _INTEGER.fullmatch(symbol):
            value = int(symbol)
            if value == 0:
                self.fail("a numeric factor must be positive", pos)
            return _Exact(Fraction(value), _ZERO_DIMS)
        match = None if symbol.endswith("]") else _WITH_EXPONENT.fullmatch(symbol)
        if match is None:
            return self.atom(symbol, pos)
        if not match["symbol"]:
            self.fail(f"invalid numeric factor {symbol!r}", pos)
        exponent = int(match["exponent"])
        if abs(exponent) > _MAX_EXPONENT:
            self.fail(f"exponent {exponent} is out of range", pos + len(match["symbol"]))
        atom = self.atom(match["symbol"], pos)
        if atom.offset is not None and exponent != 1:
            self.fail(f"a unit with an offset cannot take an exponent: {symbol!r}", pos)
        return atom.power(exponent)

    def atom(self, symbol: str, pos: int) -> _Exact:
        found = self.lookup(symbol, pos)
        if found is None and symbol in self.aliases:
            found = self.lookup(self.aliases[symbol], pos)
        if found is None:
            for prefix in _PREFIX_ORDER:
                rest = symbol[len(prefix) :]
                target = self.aliases.get(rest)
                if symbol.startswith(prefix) and target is not None:
                    atom = self.atoms.get(target)
                    if atom is not None and atom.metric:
                        found = self.prefixed(prefix, atom)
                        break
        if found is None:
            self.fail(f"unknown unit atom {symbol!r}", pos)
        return found

    def lookup(self, symbol: str, pos: int) -> _Exact | None:
        """``symbol`` as an atom, else as prefix + metric atom; None when neither."""
        atom = self.atoms.get(symbol)
        if atom is not None:
            return atom
        non_metric: tuple[str, str] | None = None
        for prefix in _PREFIX_ORDER:
            rest = symbol[len(prefix) :]
            if not rest or not symbol.startswith(prefix):
                continue
            atom = self.atoms.get(rest)
            if atom is None:
                continue
            if atom.metric:
                return self.prefixed(prefix, atom)
            non_metric = non_metric or (prefix, rest)
        if non_metric is not None:
            self.fail(f"prefix {non_metric[0]!r} cannot be applied to {non_metric[1]!r}", pos)
        return None

    @staticmethod
    def prefixed(prefix: str, atom: _Exact) -> _Exact:
        return _Exact(_PREFIXES[prefix] * atom.factor, atom.dims, molar=atom.molar)


def _build_atoms() -> Mapping[str, _Exact]:
    atoms: dict[str, _Exact] = {}
    for index, symbol in enumerate(_BASE_SYMBOLS):
        dims = tuple(int(i == index) for i in range(len(DIMENSIONS)))
        atoms[symbol] = _Exact(Fraction(1), dims, molar=index == _SUBSTANCE, metric=True)

    def define(symbol: str, metric: bool, magnitude: str, definition: str) -> None:
        """``symbol`` = ``magnitude`` x ``definition`` (a UCUM expression of earlier atoms)."""
        value = _Parser(definition, definition, atoms, {}).parse()
        atoms[symbol] = _Exact(
            Fraction(magnitude) * value.factor, value.dims, molar=value.molar, metric=metric
        )

    # dimensionless
    define("10*", False, "10", "1")
    define("10^", False, "10", "1")
    define("%", False, "1/100", "1")
    define("[ppth]", False, "1e-3", "1")
    define("[ppm]", False, "1e-6", "1")
    define("[ppb]", False, "1e-9", "1")
    define("[pptr]", False, "1e-12", "1")
    define("sr", True, "1", "rad2")
    # volume, mass
    define("L", True, "1", "dm3")
    define("l", True, "1", "dm3")
    define("t", True, "1000", "kg")
    # time (UCUM: mean Julian year and month)
    define("min", False, "60", "s")
    define("h", False, "60", "min")
    define("d", False, "24", "h")
    define("wk", False, "7", "d")
    define("a_j", False, "365.25", "d")
    define("a", False, "1", "a_j")
    define("mo_j", False, "1/12", "a_j")
    define("mo", False, "1", "mo_j")
    # international customary
    define("[in_i]", False, "2.54", "cm")
    define("[ft_i]", False, "12", "[in_i]")
    define("[yd_i]", False, "3", "[ft_i]")
    define("[mi_i]", False, "5280", "[ft_i]")
    define("[lb_av]", False, "0.45359237", "kg")
    define("[oz_av]", False, "1/16", "[lb_av]")
    define("[stone_av]", False, "14", "[lb_av]")
    # derived SI, pressure, energy
    define("Hz", True, "1", "s-1")
    define("N", True, "1", "kg.m/s2")
    define("Pa", True, "1", "N/m2")
    define("J", True, "1", "N.m")
    define("W", True, "1", "J/s")
    define("C", True, "1", "A.s")
    define("V", True, "1", "J/C")
    define("Ohm", True, "1", "V/A")
    define("bar", True, "1e5", "Pa")
    define("atm", False, "101325", "Pa")
    define("m[Hg]", True, "133.322387415", "kPa")
    define("m[H2O]", True, "9.80665", "kPa")
    define("cal", True, "4.184", "J")
    define("[Cal]", False, "1", "kcal")
    # enzyme activity, international units
    define("kat", True, "1", "mol/s")
    define("U", True, "1", "umol/min")
    define("[IU]", True, "1", "[iU]")
    # temperature with an offset: v Cel = v + 273.15 K; v [degF] = (v + 459.67) * 5/9 K
    kelvin = atoms["K"].dims
    atoms["Cel"] = _Exact(Fraction(1), kelvin, offset=Fraction("273.15"))
    atoms["[degF]"] = _Exact(Fraction(5, 9), kelvin, offset=Fraction("459.67") * Fraction(5, 9))
    return MappingProxyType(atoms)


_ATOMS: Final = _build_atoms()


def _canonical(unit: str) -> str:
    text = unit.strip()
    return EXPRESSION_ALIASES.get(text, text)


@lru_cache(maxsize=4096)
def _parse_exact(unit: str) -> _Exact:
    parser = _Parser(_canonical(unit), unit, _ATOMS, SYMBOL_ALIASES)
    result = parser.parse()
    try:
        as_float = float(result.factor)
    except OverflowError:
        as_float = 0.0
    if as_float == 0.0:
        parser.fail("magnitude out of floating-point range", 0)
    return result


@lru_cache(maxsize=4096)
def parse(unit: str) -> Unit:
    """Parse a UCUM expression (or an accepted alias); :class:`UnitError` if unsupported."""
    exact = _parse_exact(unit)
    return Unit(float(exact.factor), exact.dims, float(exact.offset or 0))


# --- analytes ------------------------------------------------------------------------------

_MOLAR_MASS: Final[Mapping[str, Fraction]] = MappingProxyType(
    {
        "cholesterol": Fraction("386.65"),
        "ldl_cholesterol": Fraction("386.65"),
        "hdl_cholesterol": Fraction("386.65"),
        "triglycerides": Fraction("885.7"),
        "glucose": Fraction("180.156"),
        "creatinine": Fraction("113.12"),
        "urea": Fraction("60.06"),
        "urea_nitrogen": Fraction("28.014"),
    }
)
#: Molar masses (g/mol) used for mass <-> substance conversions, by analyte.
MOLAR_MASS_G_PER_MOL: Final[Mapping[str, float]] = MappingProxyType(
    {name: float(mass) for name, mass in _MOLAR_MASS.items()}
)
_HBA1C: Final = "hba1c"
#: IFCC-NGSP master equation: NGSP(%) = slope * IFCC(mmol/mol) + intercept
_NGSP_SLOPE: Final = Fraction("0.09148")
_NGSP_INTERCEPT: Final = Fraction("2.152")
_PERCENT: Final = Fraction(1, 100)
_MMOL_PER_MOL: Final = Fraction(1, 1000)

#: Every analyte name the conversion functions accept.
ANALYTES: Final[frozenset[str]] = frozenset({*_MOLAR_MASS, _HBA1C})

#: LOINC code -> analyte, for the codes whose units need analyte-specific conversion.
ANALYTE_BY_LOINC: Final[dict[str, str]] = {
    # cholesterol, total
    "2093-3": "cholesterol",
    "14647-2": "cholesterol",
    # LDL cholesterol
    "13457-7": "ldl_cholesterol",
    "18262-6": "ldl_cholesterol",
    "2089-1": "ldl_cholesterol",
    "22748-8": "ldl_cholesterol",
    # HDL cholesterol
    "2085-9": "hdl_cholesterol",
    "14646-4": "hdl_cholesterol",
    # triglycerides
    "2571-8": "triglycerides",
    "14927-8": "triglycerides",
    # glucose
    "2345-7": "glucose",
    "15074-8": "glucose",
    "2339-0": "glucose",
    "14749-6": "glucose",
    # creatinine
    "2160-0": "creatinine",
    "14682-9": "creatinine",
    # urea nitrogen (BUN): mass 3094-0, moles 14937-7; urea: moles 22664-7
    "3094-0": "urea_nitrogen",
    "14937-7": "urea_nitrogen",
    "22664-7": "urea",
    # HbA1c: NGSP % (4548-4, 17856-6), IFCC mmol/mol (59261-8)
    "4548-4": _HBA1C,
    "17856-6": _HBA1C,
    "59261-8": _HBA1C,
}

_EGFR: Final = "mL/min/{1.73_m2}"
#: LOINC code -> the UCUM unit LOINC reports its results in (its example unit), for the codes
#: the criteria's concepts name and those with an analyte. A criterion's unit must convert
#: from the unit of one of its codes (:func:`suits`).
UNIT_BY_LOINC: Final[Mapping[str, str]] = MappingProxyType(
    {
        # HbA1c
        "59261-8": "mmol/mol",
        "4548-4": "%",
        "17856-6": "%",
        # eGFR, every equation: per 1.73 m2 of body surface
        "62238-1": _EGFR,
        "33914-3": _EGFR,
        "48642-3": _EGFR,
        "48643-1": _EGFR,
        "69405-9": _EGFR,
        "98979-8": _EGFR,
        # lipids
        "2093-3": "mg/dL",
        "14647-2": "mmol/L",
        "13457-7": "mg/dL",
        "18262-6": "mg/dL",
        "2089-1": "mg/dL",
        "22748-8": "mmol/L",
        "2085-9": "mg/dL",
        "14646-4": "mmol/L",
        "2571-8": "mg/dL",
        "14927-8": "mmol/L",
        # glucose
        "2345-7": "mg/dL",
        "15074-8": "mmol/L",
        "2339-0": "mg/dL",
        "14749-6": "mmol/L",
        # kidney
        "2160-0": "mg/dL",
        "14682-9": "umol/L",
        "3094-0": "mg/dL",
        "14937-7": "mmol/L",
        "22664-7": "mmol/L",
        # vital signs
        "39156-5": "kg/m2",
        "8480-6": "mm[Hg]",
        "8462-4": "mm[Hg]",
        "29463-7": "kg",
        "8302-2": "cm",
        "8867-4": "/min",
    }
)


def analyte_for_loinc(code: str) -> str | None:
    """The analyte whose conversions apply to LOINC ``code``, or None."""
    return ANALYTE_BY_LOINC.get(code.strip())


# --- conversion ----------------------------------------------------------------------------


def _check_analyte(analyte: str | None) -> None:
    if analyte is not None and analyte not in ANALYTES:
        raise ValueError(f"unknown analyte {analyte!r}; known: {', '.join(sorted(ANALYTES))}")


def _hba1c(source: _Exact, target: _Exact) -> tuple[Fraction, Fraction] | None:
    """Across the NGSP (%) and IFCC (mmol/mol) scales: the master equation; else None."""
    if source.dims != _ZERO_DIMS or target.dims != _ZERO_DIMS or source.molar == target.molar:
        return None
    if source.molar:  # IFCC -> NGSP
        # percent = slope * (x * f_s / (1/1000)) + intercept;  y = percent * (1/100) / f_t
        to_target = _PERCENT / target.factor
        scale = source.factor / _MMOL_PER_MOL * _NGSP_SLOPE * to_target
        return scale, _NGSP_INTERCEPT * to_target
    # mmol/mol = (x * f_s / (1/100) - intercept) / slope;  y = mmol/mol * (1/1000) / f_t
    to_target = _MMOL_PER_MOL / target.factor
    scale = source.factor / _PERCENT / _NGSP_SLOPE * to_target
    return scale, -_NGSP_INTERCEPT / _NGSP_SLOPE * to_target


def _mass_substance_shift(source: tuple[int, ...], target: tuple[int, ...]) -> int | None:
    """+1 when ``source`` has one more power of mass and one fewer of substance than
    ``target`` (mg/dL -> mmol/L), -1 for the reverse, None otherwise."""
    diff = [s - t for s, t in zip(source, target, strict=True)]
    shift = diff[_MASS]
    if shift not in (1, -1) or diff[_SUBSTANCE] != -shift:
        return None
    if any(d for i, d in enumerate(diff) if i not in (_MASS, _SUBSTANCE)):
        return None
    return shift


@lru_cache(maxsize=4096)
def _affine_exact(
    from_unit: str, to_unit: str, analyte: str | None
) -> tuple[Fraction, Fraction] | None:
    if _canonical(from_unit) == _canonical(to_unit):
        return Fraction(1), Fraction(0)
    source, target = _parse_exact(from_unit), _parse_exact(to_unit)
    if analyte == _HBA1C and (special := _hba1c(source, target)) is not None:
        return special
    if source.dims == target.dims:
        offset = ((source.offset or 0) - (target.offset or 0)) / target.factor
        return source.factor / target.factor, offset
    molar_mass = _MOLAR_MASS.get(analyte or "")
    if molar_mass is not None and source.offset is None and target.offset is None:
        shift = _mass_substance_shift(source.dims, target.dims)
        if shift is not None:
            return source.factor * molar_mass**-shift / target.factor, Fraction(0)
    return None


def _as_floats(
    from_unit: str, to_unit: str, exact: tuple[Fraction, Fraction]
) -> tuple[float, float]:
    try:
        return float(exact[0]), float(exact[1])
    except OverflowError:
        raise UnitError(
            f"converting {from_unit!r} to {to_unit!r} overflows floating point"
        ) from None


def affine(from_unit: str, to_unit: str, analyte: str | None = None) -> tuple[float, float] | None:
    """``(scale, offset)`` with ``to = from * scale + offset``; None when not convertible
    (incommensurable or unparseable units). ``analyte`` (one of :data:`ANALYTES`) enables
    mass <-> substance and HbA1c conversions; an unknown analyte raises ValueError."""
    _check_analyte(analyte)
    try:
        exact = _affine_exact(from_unit, to_unit, analyte)
        return None if exact is None else _as_floats(from_unit, to_unit, exact)
    except UnitError:
        return None


def suits(unit: str, loinc_code: str) -> bool | None:
    """Whether results of ``loinc_code`` (in its :data:`UNIT_BY_LOINC` unit) convert to
    ``unit``; None when the code's unit is not known here."""
    code = loinc_code.strip()
    reported = UNIT_BY_LOINC.get(code)
    if reported is None:
        return None
    return affine(reported, unit, analyte_for_loinc(code)) is not None


def commensurable(a: str, b: str, analyte: str | None = None) -> bool:
    """Whether values in ``a`` convert to ``b`` (for ``analyte``, if given)."""
    return affine(a, b, analyte) is not None


def _describe(dims: tuple[int, ...]) -> str:
    parts = [
        symbol if exponent == 1 else f"{symbol}{exponent}"
        for symbol, exponent in zip(_BASE_SYMBOLS, dims, strict=True)
        if exponent
    ]
    return ".".join(parts) or "dimensionless"


def _incommensurable(from_unit: str, to_unit: str, analyte: str | None) -> str:
    source, target = _parse_exact(from_unit), _parse_exact(to_unit)
    message = (
        f"cannot convert {from_unit!r} ({_describe(source.dims)}) "
        f"to {to_unit!r} ({_describe(target.dims)})"
    )
    if _mass_substance_shift(source.dims, target.dims) is not None:
        if analyte is None:
            return message + ": mass <-> substance needs an analyte with a known molar mass"
        return message + f": analyte {analyte!r} has no molar mass"
    return message + ("" if analyte is None else f" (analyte {analyte!r})")


def convert(value: float, from_unit: str, to_unit: str, analyte: str | None = None) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit``. Raises :class:`UnitError` for an
    unparseable unit and :class:`IncommensurableUnits` when there is no conversion."""
    _check_analyte(analyte)
    exact = _affine_exact(from_unit, to_unit, analyte)
    if exact is None:
        raise IncommensurableUnits(_incommensurable(from_unit, to_unit, analyte))
    scale, offset = _as_floats(from_unit, to_unit, exact)
    return value * scale + offset
