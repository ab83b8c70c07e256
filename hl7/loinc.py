"""LOINC codes the product uses and unit normalisation to one canonical unit each.

Canonical units follow the NHANES laboratory files the models are trained on,
so a value from any LIS means the same number to the model.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Analyte:
    loinc: str  # canonical code
    name: str
    unit: str  # canonical UCUM unit
    factors: dict[str, float]  # accepted unit (normalised spelling) -> factor to canonical
    plausible: tuple[float, float] = (0.0, float("inf"))  # in the canonical unit; outside = data error


def _u(*pairs: tuple[str, float]) -> dict[str, float]:
    return {normalise_unit(u): f for u, f in pairs}


def normalise_unit(unit: str) -> str:
    u = unit.strip().lower().replace("µ", "u").replace("μ", "u").replace(" ", "")
    for a, b in (("^", "*"), ("x10e", "10*"), ("x10*", "10*"), ("e3/ul", "10*3/ul"), ("iu/l", "u/l")):
        u = u.replace(a, b)
    return u


_COUNT = _u(("10*3/uL", 1.0), ("10*9/L", 1.0), ("K/uL", 1.0), ("/nL", 1.0), ("{cells}/uL", 1e-3), ("/uL", 1e-3))

_ANALYTES = [
    Analyte("17861-6", "Calcium", "mg/dL", _u(("mg/dL", 1.0), ("mmol/L", 4.008)), (4.0, 16.0)),
    Analyte("2777-1", "Phosphate", "mg/dL", _u(("mg/dL", 1.0), ("mmol/L", 3.097)), (0.5, 15.0)),
    Analyte("6768-6", "Alkaline phosphatase", "U/L", _u(("U/L", 1.0), ("IU/L", 1.0), ("ukat/L", 60.0)), (5.0, 3000.0)),
    Analyte("1751-7", "Albumin", "g/dL", _u(("g/dL", 1.0), ("g/L", 0.1)), (0.5, 7.0)),
    Analyte("2160-0", "Creatinine", "mg/dL", _u(("mg/dL", 1.0), ("umol/L", 1 / 88.42)), (0.1, 25.0)),
    Analyte("2885-2", "Total protein", "g/dL", _u(("g/dL", 1.0), ("g/L", 0.1)), (2.0, 15.0)),
    Analyte("2345-7", "Glucose", "mg/dL", _u(("mg/dL", 1.0), ("mmol/L", 18.016)), (10.0, 2000.0)),
    Analyte("3094-0", "Urea nitrogen", "mg/dL", _u(("mg/dL", 1.0), ("mmol/L", 2.801)), (1.0, 300.0)),
    Analyte("62292-8", "25-hydroxyvitamin D (D2+D3)", "nmol/L", _u(("nmol/L", 1.0), ("ng/mL", 2.496)), (2.0, 500.0)),
    Analyte("1989-3", "25-hydroxyvitamin D3", "nmol/L", _u(("nmol/L", 1.0), ("ng/mL", 2.496)), (2.0, 500.0)),
    Analyte("2731-8", "Parathyrin intact", "pg/mL", _u(("pg/mL", 1.0), ("ng/L", 1.0), ("pmol/L", 9.43)), (1.0, 5000.0)),
    Analyte("718-7", "Hemoglobin", "g/dL", _u(("g/dL", 1.0), ("g/L", 0.1), ("g/mL", 100.0), ("mmol/L", 1.611)),
            (2.0, 25.0)),
    Analyte("6690-2", "Leukocytes", "10*3/uL", _COUNT, (0.1, 500.0)),
    Analyte("777-3", "Platelets", "10*3/uL", _COUNT, (1.0, 3000.0)),
]

ANALYTES: dict[str, Analyte] = {a.loinc: a for a in _ANALYTES}

# Other LOINC codes for the same quantity, reported in other units or methods.
ALIASES: dict[str, str] = {
    "2000-8": "17861-6",  # Calcium [Moles/volume]
    "49765-1": "17861-6",  # Calcium [Mass/volume] in Blood
    "14879-1": "2777-1",  # Phosphate [Moles/volume]
    "77141-0": "6768-6",  # ALP by IFCC method
    "61151-7": "1751-7",  # Albumin by BCG
    "61152-5": "1751-7",  # Albumin by BCP
    "14682-9": "2160-0",  # Creatinine [Moles/volume]
    "2339-0": "2345-7",  # Glucose in Blood
    "14749-6": "2345-7",  # Glucose [Moles/volume]
    "14937-7": "3094-0",  # Urea nitrogen [Moles/volume]
    "35365-6": "62292-8",  # 25-OH vitamin D by screen method
    "14635-7": "1989-3",  # 25-OH vitamin D3 [Moles/volume]
    "59260-0": "718-7",  # Hemoglobin [Moles/volume]
    "26464-8": "6690-2",  # Leukocytes in Blood
    "26515-7": "777-3",  # Platelets in Blood
}


class UnitError(ValueError):
    pass


def canonical_code(code: str, system: str) -> str | None:
    """The canonical LOINC for an observation identifier, or None when not one we use."""
    sysu = system.strip().upper()
    if sysu and sysu not in ("LN", "LOINC", "2.16.840.1.113883.6.1"):
        return None
    code = code.strip()
    if code in ANALYTES:
        return code
    return ALIASES.get(code)


def to_canonical(loinc: str, value: float, unit: str) -> tuple[float, str]:
    """Value in the canonical unit; UnitError for unknown units or physiologically impossible values."""
    analyte = ANALYTES[loinc]
    factor = analyte.factors.get(normalise_unit(unit))
    if factor is None:
        raise UnitError(f"unit {unit!r} not recognised for {analyte.name} (expected one of "
                        f"{', '.join(sorted(analyte.factors))})")
    converted = value * factor
    lo, hi = analyte.plausible
    if not lo <= converted <= hi:
        raise UnitError(f"implausible {analyte.name} {converted:.4g} {analyte.unit} (from {value:g} {unit}; "
                        f"plausible {lo:g}-{hi:g}): excluded")
    return converted, analyte.unit
