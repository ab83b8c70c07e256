"""The lab mapping table: local codes and LOINC -> canonical analytes, units and plausible ranges.

The table is configuration, not code: ``hl7/lab_mapping.toml`` ships with the
product and a site points ``labs.mapping_file`` at its own copy. Canonical units
follow the NHANES laboratory files the models are trained on, so a value from
any LIS means the same number to the model.
"""
from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SHIPPED_MAPPING = Path(__file__).with_name("lab_mapping.toml")
LOINC_SYSTEMS = ("LN", "LOINC", "2.16.840.1.113883.6.1")
NUMERIC_VALUE_TYPES = ("", "NM", "SN", "ST", "TX")


class UnitError(ValueError):
    pass


class MappingError(ValueError):
    """The mapping file is unreadable or inconsistent; the message names the entry."""


def normalise_unit(unit: str) -> str:
    u = unit.strip().lower().replace(" ", "")
    # micro as UTF-8 bytes read as Latin-1 (a sender writing UTF-8 without MSH-18) before the plain signs
    for micro in ("âµ", "î¼", "µ", "μ"):
        u = u.replace(micro, "u")
    for a, b in (("^", "*"), ("x10e", "10*"), ("x10*", "10*"), ("10e", "10*"), ("e3/ul", "10*3/ul"),
                 ("iu/l", "u/l")):
        u = u.replace(a, b)
    return u


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnalyteEntry(_Entry):
    loinc: str = Field(min_length=3)
    name: str = Field(min_length=1)
    specimen: str = ""
    unit: str = Field(min_length=1)
    units: dict[str, float]
    plausible: tuple[float, float] = (0.0, float("inf"))
    aliases: list[str] = Field(default_factory=list)

    @field_validator("units")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one accepted unit is needed")
        bad = [u for u, f in v.items() if not f > 0]
        if bad:
            raise ValueError(f"conversion factors must be > 0 (units {bad})")
        return v

    @model_validator(mode="after")
    def _range(self) -> "AnalyteEntry":
        if not self.plausible[0] < self.plausible[1]:
            raise ValueError(f"plausible range of {self.loinc} must be [low, high] with low < high")
        if normalise_unit(self.unit) not in {normalise_unit(u) for u in self.units}:
            raise ValueError(f"the canonical unit {self.unit!r} of {self.loinc} must be among its accepted units")
        return self


class LocalCodeEntry(_Entry):
    system: str = ""
    code: str = Field(min_length=1)
    loinc: str


class MappingFile(_Entry):
    analyte: list[AnalyteEntry]
    local_code: list[LocalCodeEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Analyte:
    loinc: str  # canonical code
    name: str
    unit: str  # canonical UCUM unit
    factors: dict[str, float]  # accepted unit (normalised spelling) -> factor to canonical
    plausible: tuple[float, float] = (0.0, float("inf"))  # in the canonical unit; outside = data error
    specimen: str = ""


@dataclass(frozen=True)
class Interpretation:
    """What the mapping makes of one OBX: a canonical value, or the reason there is none."""

    loinc: str | None
    value: float | None = None
    unit: str | None = None
    problem: str | None = None


class LabMapping:
    def __init__(self, analytes: list[Analyte], aliases: dict[str, str], local: dict[tuple[str, str], str],
                 source: str) -> None:
        self.analytes = {a.loinc: a for a in analytes}
        self.aliases = aliases
        self.local = local  # (SYSTEM upper-case, code) -> canonical LOINC
        self.source = source

    def convert(self, loinc: str, value: float, from_unit: str, to_unit: str) -> float | None:
        """``value`` of analyte ``loinc`` from one of its accepted units to another; None when either is unknown."""
        analyte = self.analytes.get(loinc)
        if analyte is None:
            return None
        a, b = analyte.factors.get(normalise_unit(from_unit)), analyte.factors.get(normalise_unit(to_unit))
        return None if a is None or b is None else value * a / b

    def canonical_code(self, code: str, system: str) -> str | None:
        """The canonical LOINC for an observation identifier, or None when the table does not map it."""
        code, sysu = code.strip(), system.strip().upper()
        if (sysu, code) in self.local:
            return self.local[(sysu, code)]
        if sysu and sysu not in LOINC_SYSTEMS:
            return None
        if code in self.analytes:
            return code
        return self.aliases.get(code)

    def to_canonical(self, loinc: str, value: float, unit: str) -> tuple[float, str]:
        """Value in the canonical unit; UnitError for unknown units or physiologically impossible values."""
        analyte = self.analytes[loinc]
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

    def interpret(self, code: str, system: str, alt_code: str, alt_system: str, value_type: str, value_text: str,
                  unit_text: str) -> Interpretation:
        """Map one OBX (identifier, alternate identifier, type, value, unit) to a canonical value."""
        loinc = self.canonical_code(code, system)
        if loinc is None and alt_code:
            loinc = self.canonical_code(alt_code, alt_system)  # alternate identifier (often the LOINC)
        if loinc is None:
            return Interpretation(None, problem="not mapped by the lab mapping table")
        if value_type.strip().upper() not in NUMERIC_VALUE_TYPES:
            return Interpretation(loinc, problem=f"value type {value_type} is not numeric")
        text = value_text.replace("^", "").strip()
        comparator = text[:len(text) - len(text.lstrip("<>= "))]  # every leading comparator sign ('=>', '<=', ...)
        try:
            number = float(text[len(comparator):].strip())
        except ValueError:
            return Interpretation(loinc, problem=f"value {value_text!r} is not a number")
        comparator = comparator.replace(" ", "")
        if "<" in comparator or ">" in comparator:
            return Interpretation(loinc, problem=f"value {value_text!r} is censored ({comparator}): not a measurement")
        try:
            value, unit = self.to_canonical(loinc, number, unit_text)
        except UnitError as exc:
            return Interpretation(loinc, problem=str(exc))
        return Interpretation(loinc, value, unit)


def _build(parsed: MappingFile, source: str) -> LabMapping:
    analytes, aliases, local = [], {}, {}
    seen: set[str] = set()
    for e in parsed.analyte:
        for code in (e.loinc, *e.aliases):
            if code in seen:
                raise MappingError(f"{source}: LOINC {code} appears twice")
            seen.add(code)
        factors = {normalise_unit(u): f for u, f in e.units.items()}
        analytes.append(Analyte(e.loinc, e.name, e.unit, factors, e.plausible, e.specimen))
        aliases.update({a: e.loinc for a in e.aliases})
    canon = {a.loinc for a in analytes}
    for lc in parsed.local_code:
        target = lc.loinc if lc.loinc in canon else aliases.get(lc.loinc)
        if target is None:
            raise MappingError(f"{source}: local code {lc.system}^{lc.code} maps to {lc.loinc}, "
                               "which is not an analyte in the table")
        local[(lc.system.strip().upper(), lc.code.strip())] = target
    return LabMapping(analytes, aliases, local, source)


@functools.lru_cache(maxsize=8)
def load_mapping(path: str | Path | None = None) -> LabMapping:
    """The mapping table at ``path`` (the shipped table when None); MappingError names what is wrong."""
    p = Path(path) if path else SHIPPED_MAPPING
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MappingError(f"cannot read the lab mapping file {p}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{p}: not valid TOML: {exc}") from exc
    try:
        parsed = MappingFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise MappingError(f"{p}: {where}: {first['msg']}") from exc
    return _build(parsed, str(p))


DEFAULT = load_mapping()
ANALYTES = DEFAULT.analytes
ALIASES = DEFAULT.aliases
canonical_code = DEFAULT.canonical_code
to_canonical = DEFAULT.to_canonical
