"""Demographics taken from the DICOM header of the screened series."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Demographics:
    age_years: float | None
    sex: str | None  # "F", "M" or None
    height_m: float | None
    weight_kg: float | None
    notes: tuple[str, ...] = ()  # header values left out as implausible, and why

    @property
    def bmi(self) -> float | None:
        if self.height_m and self.weight_kg and self.height_m > 0.5:
            return self.weight_kg / self.height_m**2
        return None


IDENTITY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")


def identity_of(ds) -> tuple[str, ...]:
    """The patient identity a header carries (what a PACS identity update changes)."""
    return tuple(str(ds.get(k, "") or "").strip() for k in IDENTITY_KEYWORDS)


def _date(value: object) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value)[:8], "%Y%m%d").date()
    except (TypeError, ValueError):
        return None


def study_date(ds: Dataset) -> dt.date | None:
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        d = _date(ds.get(kw, ""))
        if d:
            return d
    return None


def age_years(ds: Dataset) -> float | None:
    """Age at the study: PatientAge when present (nnnD/W/M/Y), else birth date vs study date."""
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        n = int(age[:3])
        return {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12.0, "Y": float(n)}[age[3]]
    born, seen = _date(ds.get("PatientBirthDate", "")), study_date(ds)
    if born and seen and seen >= born:
        return calendar_age(born, seen)
    return None


def _birthday(born: dt.date, year: int) -> dt.date:
    """The birthday in ``year`` (29 February: 1 March in a common year)."""
    try:
        return born.replace(year=year)
    except ValueError:
        return dt.date(year, 3, 1)


def calendar_age(born: dt.date, on: dt.date) -> float:
    """Age on ``on`` in years: the completed years by the calendar (a birthday reached counts, whatever the leap
    days), plus the fraction of the current year of life, so that ``int()`` of it is the age a person states."""
    last = _birthday(born, on.year)
    if last > on:
        last = _birthday(born, on.year - 1)
    following = _birthday(born, last.year + 1)
    return (last.year - born.year) + (on - last).days / (following - last).days


def _positive(ds: Dataset, keyword: str) -> float | None:
    try:
        v = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


# What a header value must lie in to be used: outside, it is a typing or unit error (a height of 165 entered
# in the metres field), and the model, trained on NHANES adults, would read it as an extreme patient.
PLAUSIBLE = {"PatientSize": (1.0, 2.5, "m"), "PatientWeight": (25.0, 300.0, "kg"), "age": (0.0, 120.0, "y")}


def _plausible(value: float | None, keyword: str, notes: list[str]) -> float | None:
    lo, hi, unit = PLAUSIBLE[keyword]
    if value is None or lo <= value <= hi:
        return value
    hint = " (DICOM gives it in metres: entered in cm?)" if keyword == "PatientSize" and 100 <= value <= 250 else (
        " (entered in g?)" if keyword == "PatientWeight" and value > 1000 else "")
    notes.append(f"{keyword} {value:g} not used: outside {lo:g}-{hi:g} {unit}{hint}")
    return None


def _age_disagreement(ds: Dataset) -> str | None:
    """A note when PatientAge and the birth date at the study date differ by more than a year (a header edited by
    hand, a wrong birth date): the model's largest input should not be silently one of two values."""
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    born, seen = _date(ds.get("PatientBirthDate", "")), study_date(ds)
    if not (len(age) == 4 and age[:3].isdigit() and age[3] == "Y" and born and seen and seen >= born):
        return None
    by_date = calendar_age(born, seen)
    if abs(int(age[:3]) - by_date) < 1.0:
        return None
    return f"PatientAge {age} and the birth date ({int(by_date)} y at the study) disagree: PatientAge used"


def demographics_from_header(ds: Dataset) -> Demographics:
    sex = str(ds.get("PatientSex", "") or "").upper()
    notes: list[str] = [n for n in (_age_disagreement(ds),) if n]
    return Demographics(
        age_years=_plausible(age_years(ds), "age", notes),
        sex=sex if sex in ("F", "M") else None,
        height_m=_plausible(_positive(ds, "PatientSize"), "PatientSize", notes),
        weight_kg=_plausible(_positive(ds, "PatientWeight"), "PatientWeight", notes),
        notes=tuple(notes),
    )
