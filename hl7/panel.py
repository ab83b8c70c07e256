"""The lab contract handed to the pipeline: values keyed by LOINC, in canonical units."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabValue:
    loinc: str
    name: str
    value: float  # in ``unit``, the canonical unit for this LOINC code
    unit: str  # UCUM
    observed_at: dt.datetime | None
    source: str  # sending facility and message control ID
    original: str = ""  # value and unit as received
    flags: str = ""  # OBX-8 abnormal flags as the lab sent them (L, H, LL, HH, A, ...); "~" between repeats
    status: str = "F"  # OBX-11 of the value used (F, C, A; P only where preliminary results are accepted)


@dataclass(frozen=True)
class LabExclusion:
    code: str
    name: str
    reason: str


@dataclass(frozen=True)
class LabPanel:
    """Labs for one patient around one study date. Empty is normal, not an error."""

    patient_id: str
    issuer: str | None
    reference_date: dt.date | None
    window_days: int
    values: tuple[LabValue, ...] = ()
    excluded: tuple[LabExclusion, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def get(self, loinc: str) -> LabValue | None:
        return next((v for v in self.values if v.loinc == loinc), None)

    @property
    def is_empty(self) -> bool:
        return not self.values
