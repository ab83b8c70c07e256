"""``osteoscreen predictions``: every result as one CSV row, for comparison with the site's DXA.

Meant for shadow mode (site validation before go-live), usable any time. Rows hold
patient identifiers so that the site can join them to its DXA results: the file is
written 0600 and its folder must be a PHI-safe place.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from dicom_node.csvcells import csv_text
from dicom_node.db import NodeDB
from pipeline.durable import write_durably

COLUMNS = ("job_id", "finished_at", "patient_id", "issuer", "accession_number", "study_uid", "study_date",
           "status", "reason", "category_id", "probability", "threshold", "modalities", "level", "mean_hu",
           "median_hu", "slice_selection", "contrast_phase", "calibration_plausible", "labs_used", "model",
           "duplicate_of", "path", "experimental", "shadow", "input_notes")


def prediction_rows(db: NodeDB, start: float, end: float) -> list[dict]:
    rows = []
    for job_id, finished, r in db.finished_jobs(start, end):
        sel = r.get("selection") or {}
        rows.append({
            "job_id": job_id,
            "finished_at": dt.datetime.fromtimestamp(finished).isoformat(timespec="seconds"),
            "patient_id": r.get("patient_id", ""), "issuer": r.get("issuer", ""),
            "accession_number": r.get("accession_number", ""), "study_uid": r.get("study_uid", ""),
            "study_date": r.get("study_date", ""), "status": "screened" if "probability" in r else "not_screened",
            "reason": r.get("reason") or r.get("image_note") or "", "category_id": r.get("category_id", ""),
            "probability": r.get("probability", ""), "threshold": r.get("threshold", ""),
            "modalities": "+".join(r.get("modalities", [])), "level": r.get("level", ""),
            "mean_hu": r.get("mean_hu", ""), "median_hu": r.get("median_hu", ""),
            "slice_selection": sel.get("method", ""),
            "contrast_phase": (r.get("contrast") or {}).get("phase", ""),
            "calibration_plausible": (r.get("calibration") or {}).get("plausible", ""),
            "labs_used": ";".join(v["loinc"] for v in r.get("labs_used", [])), "model": r.get("model", ""),
            "duplicate_of": r.get("duplicate_of", ""),
            # the EXPERIMENTAL chest radiograph path, and shadow-mode results, told apart from the CT path's
            "path": r.get("path", "ct"), "experimental": "yes" if r.get("experimental") else "no",
            "shadow": "yes" if r.get("shadow") else "no", "input_notes": "; ".join(r.get("input_notes", [])),
        })
    return rows


def export_predictions(db: NodeDB, out: Path, since: dt.date | None = None) -> int:
    start = dt.datetime.combine(since, dt.time()).timestamp() if since else 0.0
    rows = prediction_rows(db, start, dt.datetime.now().timestamp() + 1)
    data = csv_text(COLUMNS, rows).encode()  # patient ID, issuer, accession: the sender's text, made formula-safe
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_durably(out, lambda fh: fh.write(data))
    os.chmod(out, 0o600)
    return len(rows)
