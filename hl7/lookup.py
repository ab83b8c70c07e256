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
) -> LabPanel:
    """The most recent usable value per LOINC code within the window before the study.

    Values of analytes the product uses that cannot be used (outside the window,
    unit not recognised, not final, not numeric) are listed with the reason.
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
    for obs in store.observations_for(patient_id, issuer, match_without_issuer):
        if obs.loinc is None or obs.loinc not in ANALYTES:
            continue
        name = ANALYTES[obs.loinc].name
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
