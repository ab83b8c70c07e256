"""Stored lab results -> the LabPanel for one patient and study date."""
from __future__ import annotations

import datetime as dt

from hl7.mapping import DEFAULT, LabMapping
from hl7.panel import LabExclusion, LabPanel, LabValue
from hl7.parse_worker import parse_pending
from hl7.store import LabStore, StoredObservation

FINAL_STATUSES = {"F", "C", "A", ""}  # final, corrected, amended; empty is treated as final (OBX-11 is optional)
DELETING_STATUSES = {"D", "W"}  # delete the earlier OBX; posted original was wrong
# A later result for the same analyte and observation time replaces every earlier one (a correction, an
# amendment, "not obtainable", a deletion) whether or not it can be used itself: a censored or unreadable
# correction must not leave the value it corrects in use. A final result replaces earlier non-final ones.
REPLACING_ALL = DELETING_STATUSES | {"C", "A", "X"}
REPLACING_NON_FINAL = {"F", ""}
NON_FINAL = {"P", "R", "S", "I"}
STATUS_TEXT = {"P": "preliminary", "R": "entered, not verified", "S": "partial", "I": "pending", "X": "not obtainable",
               "D": "deletion", "W": "posted as wrong", "N": "not asked", "O": "order detail", "C": "correction",
               "A": "amendment", "F": "final", "": "final"}


def _superseded(observations: list[StoredObservation], mapping: LabMapping) -> dict[int, str]:
    """Index -> reason, for values a later result replaces (same analyte, same observation time; see
    REPLACING_ALL and REPLACING_NON_FINAL)."""
    later: list[tuple[str, dt.datetime | None, int, str]] = []
    for o in observations:
        if o.status in REPLACING_ALL | REPLACING_NON_FINAL:
            loinc = mapping.interpret(o.code, o.code_system, o.alt_code, o.alt_system, "", "0", "").loinc
            if loinc:
                later.append((loinc, o.observed_at, o.message_id, o.status))
    gone: dict[int, str] = {}
    if not later:
        return gone
    for i, o in enumerate(observations):
        if o.status in DELETING_STATUSES:
            continue
        loinc = mapping.interpret(o.code, o.code_system, o.alt_code, o.alt_system, "", "0", "").loinc
        for r_loinc, r_when, r_mid, r_status in later:
            if loinc != r_loinc or o.message_id >= r_mid:
                continue
            # A deletion or correction with no observation time (no OBX-14, no OBR-7) cannot say which value it
            # replaces: it withdraws every earlier value of the analyte rather than leave a deleted one in use.
            undated = r_when is None and r_status in REPLACING_ALL
            if o.observed_at != r_when and not undated:
                continue
            if r_status in REPLACING_ALL or o.status in NON_FINAL:
                verb = "withdrawn" if r_status in DELETING_STATUSES else "replaced"
                gone[i] = (f"{verb} by a later result (OBX-11 {r_status or 'F'}, {STATUS_TEXT[r_status]}"
                           + (", with no observation time: every earlier value of the analyte" if undated else "")
                           + ")")
    return gone


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
    mapping: LabMapping = DEFAULT,
    accept_preliminary: bool = False,
    issuer_aliases: dict[str, str] | None = None,
) -> LabPanel:
    """The most recent usable value per analyte within the window before the study.

    Values the mapping table knows but that cannot be used (outside the window,
    unit not recognised, implausible, not final, withdrawn, not numeric) are
    listed with the reason. Identity: a message whose PID birth date or sex
    contradicts the image's is another patient with the same identifier (or a
    data error): its results are blocked, with the reason, never used.
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
    else:  # a value of any age could be taken as this study's: none is
        return LabPanel(patient_id, issuer, study_date, window_days,
                        notes=("study date unknown (no StudyDate, SeriesDate, AcquisitionDate or ContentDate): labs "
                               "not used, their dates cannot be checked against the study",))
    study_day_end = dt.datetime.combine(study_date, dt.time.max)
    parse_pending(store, patient_id=patient_id, mapping=mapping)  # messages the background parser has not reached
    want_dob = birth_date.strftime("%Y%m%d") if birth_date else ""
    want_sex = (sex or "").upper()[:1]
    blocked: set[int] = set()
    accepted = FINAL_STATUSES | ({"P"} if accept_preliminary else set())
    observations = store.observations_for(patient_id, issuer, match_without_issuer, issuer_aliases)
    withdrawn = _superseded(observations, mapping)
    for i, obs in enumerate(observations):
        found = mapping.interpret(obs.code, obs.code_system, obs.alt_code, obs.alt_system, obs.value_type,
                                  obs.value_text, obs.unit_text)
        if found.loinc is None or obs.status in DELETING_STATUSES:
            continue
        loinc = found.loinc
        name = mapping.analytes[loinc].name
        clash = []
        if want_dob and obs.birth_date and obs.birth_date != want_dob:
            clash.append("birth date")
        if want_sex in ("F", "M") and obs.sex in ("F", "M") and obs.sex != want_sex:
            clash.append("sex")
        if clash:
            if obs.message_id not in blocked:
                blocked.add(obs.message_id)
                notes.append(f"labs from {obs.source} blocked: {' and '.join(clash)} differ from the image's")
            excluded[(loinc, "identity")] = LabExclusion(
                loinc, name, f"blocked: {' and '.join(clash)} in the lab message differ from the image's")
            continue
        if i in withdrawn:
            excluded[(loinc, "withdrawn")] = LabExclusion(loinc, name, withdrawn[i])
            continue
        if obs.status not in accepted:
            what = STATUS_TEXT.get(obs.status, "not final")
            excluded[(loinc, "status")] = LabExclusion(loinc, name, f"result status {obs.status} ({what}) is not used")
            continue
        if found.problem or found.value is None:
            excluded[(loinc, found.problem or "no value")] = LabExclusion(loinc, name, found.problem or "no value")
            continue
        if start is not None and (obs.observed_at is None or not start <= obs.observed_at <= end):
            when = obs.observed_at.date().isoformat() if obs.observed_at else "undated"
            excluded[(loinc, "window")] = LabExclusion(
                loinc, name, f"observed {when}, outside the window ({window_days} days before the study to "
                             f"{after_days} day(s) after it)")
            continue
        # The latest value up to the end of the study day wins; only without one, the earliest after it. At the
        # same time a correction beats the original, final beats preliminary.
        stamp = obs.observed_at.timestamp() if obs.observed_at else float("-inf")
        before = obs.observed_at is not None and obs.observed_at <= study_day_end
        # On a tie the analyte's own code beats an alias (another specimen or method: blood glucose beside serum
        # glucose in one message).
        canonical = loinc in (obs.code, obs.alt_code)
        rank = (before, stamp if before else -stamp, obs.status == "C", obs.status != "P", canonical, obs.message_id)
        if loinc not in values or rank > ranks[loinc]:
            ranks[loinc] = rank
            values[loinc] = LabValue(
                loinc=loinc, name=name, value=float(found.value), unit=str(found.unit),
                observed_at=obs.observed_at, source=obs.source, original=f"{obs.value_text} {obs.unit_text}".strip(),
                flags=obs.abnormal_flags, status=obs.status or "F",
            )
    kept = tuple(sorted(values.values(), key=lambda v: v.loinc))
    dropped = tuple(e for (code, _), e in sorted(excluded.items()) if code not in values)
    return LabPanel(patient_id, issuer, study_date, window_days, kept, dropped, tuple(notes))
