"""Stored lab results -> the LabPanel for one patient and study date."""
from __future__ import annotations

import datetime as dt

from hl7.loinc import ANALYTES
from hl7.panel import LabExclusion, LabPanel, LabValue
from hl7.parse_worker import parse_pending
from hl7.store import LabStore


def lookup_labs(
    store: LabStore,
    patient_id: str,
    issuer: str | None,
    study_date: dt.date | None,
    *,
    window_days: int = 90,
    after_days: int = 1,
    match_without_issuer: bool = True,
    birth_date: dt.date | None = None,
    sex: str | None = None,
) -> LabPanel:
    """The most recent usable value per LOINC code within the window before the study.

    Values of analytes the product uses that cannot be used (outside the window,
    unit not recognised, not final, not numeric) are listed with the reason.
    Identity: a message whose PID birth date or sex contradicts the image's is
    another patient with the same identifier (or a data error): its results are
    blocked, with the reason, never used.
    """
    values: dict[str, LabValue] = {}
    excluded: dict[tuple[str, str], LabExclusion] = {}
    notes: list[str] = []
    ranks: dict[str, tuple] = {}
    if not patient_id:
        return LabPanel(patient_id, issuer, study_date, window_days, notes=("no patient ID in the study",))
    start = end = None
    if study_date is not None:
        start = dt.datetime.combine(study_date - dt.timedelta(days=window_days), dt.time.min)
        end = dt.datetime.combine(study_date + dt.timedelta(days=after_days), dt.time.max)
    else:
        notes.append("study date unknown: lab dates not checked")
    parse_pending(store, patient_id=patient_id)  # messages the background parser has not reached yet
    want_dob = birth_date.strftime("%Y%m%d") if birth_date else ""
    want_sex = (sex or "").upper()[:1]
    blocked: set[int] = set()
    for obs in store.observations_for(patient_id, issuer, match_without_issuer):
        if obs.loinc is None or obs.loinc not in ANALYTES:
            continue
        name = ANALYTES[obs.loinc].name
        clash = []
        if want_dob and obs.birth_date and obs.birth_date != want_dob:
            clash.append("birth date")
        if want_sex in ("F", "M") and obs.sex in ("F", "M") and obs.sex != want_sex:
            clash.append("sex")
        if clash:
            if obs.message_id not in blocked:
                blocked.add(obs.message_id)
                notes.append(f"labs from {obs.source} blocked: {' and '.join(clash)} differ from the image's")
            excluded[(obs.loinc, "identity")] = LabExclusion(
                obs.loinc, name, f"blocked: {' and '.join(clash)} in the lab message differ from the image's")
            continue
        if obs.problem or obs.value is None:
            excluded[(obs.loinc, obs.problem or "no value")] = LabExclusion(obs.loinc, name, obs.problem or "no value")
            continue
        if start is not None and (obs.observed_at is None or not start <= obs.observed_at <= end):
            when = obs.observed_at.date().isoformat() if obs.observed_at else "undated"
            excluded[(obs.loinc, "window")] = LabExclusion(
                obs.loinc, name, f"observed {when}, outside {window_days} days before the study")
            continue
        current = values.get(obs.loinc)
        rank = (obs.observed_at or dt.datetime.min, obs.status == "C", obs.message_id)
        if current is None or rank > ranks[obs.loinc]:
            ranks[obs.loinc] = rank  # latest observation; a correction supersedes the original
            values[obs.loinc] = LabValue(
                loinc=obs.loinc, name=name, value=float(obs.value), unit=str(obs.unit),
                observed_at=obs.observed_at, source=obs.source, original=f"{obs.value_text} {obs.unit_text}".strip(),
            )
    kept = tuple(sorted(values.values(), key=lambda v: v.loinc))
    dropped = tuple(e for (code, _), e in sorted(excluded.items()) if code not in values)
    return LabPanel(patient_id, issuer, study_date, window_days, kept, dropped, tuple(notes))
