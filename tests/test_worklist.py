"""The care coordinators' daily worklist: positive screens of the last 24 h, CSV + JSON, private files."""
import csv
import datetime as dt
import json
import stat
import subprocess
import sys

from dicom_node.db import NodeDB
from dicom_node.worklist import write_worklist


def _job(db: NodeDB, n: int, result: dict, finished: float) -> None:
    series = f"1.2.3.{n}"
    db.index_instance(sop_uid=f"{series}.1", sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3", series_uid=series,
                      path="/dev/null", transfer_syntax="1.2.840.10008.1.2.1", calling_aet="CT1", patient_id="P1",
                      issuer="HOSP", modality="CT")
    job_id = db.decide_series(series, True, "test")
    db.finish_job(job_id, "screened", result, [])
    db._db.execute("UPDATE jobs SET updated_at=? WHERE id=?", (finished, job_id))


def test_worklist_lists_positive_screens_of_the_last_day_only(tmp_path):
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    day = dt.date(2026, 1, 6)
    at = dt.time(6, 0)
    end = dt.datetime.combine(day, at).timestamp()
    base = {"patient_id": "P1", "issuer": "HOSP", "accession_number": "ACC1", "study_uid": "1.2.3",
            "study_date": "20260105", "category": "Elevated risk", "probability": 0.2, "level": "L1", "mean_hu": 94.0,
            "model": "m 1", "sr_sop_instance_uid": "1.2.3.9"}
    _job(db, 1, {**base, "category_id": "screen_positive"}, end - 3600)
    _job(db, 2, {**base, "category_id": "screen_negative", "patient_id": "P2"}, end - 3600)
    _job(db, 3, {**base, "category_id": "screen_positive", "patient_id": "P3"}, end - 2 * 86400)  # older
    _job(db, 4, {**base, "category_id": "screen_positive", "duplicate_of": "1.2.3.9"}, end - 60)  # no new report
    path, n = write_worklist(db, tmp_path / "wl", day, at=at)
    db.close()
    assert n == 1 and path.name == "worklist-2026-01-06.csv"
    rows = list(csv.DictReader(path.open()))
    assert [r["patient_id"] for r in rows] == ["P1"] and rows[0]["accession_number"] == "ACC1"
    doc = json.loads(path.with_suffix(".json").read_text())
    assert "RESEARCH USE ONLY" in doc["notice"] and doc["positive_screens"][0]["job_id"] == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE((tmp_path / "wl").stat().st_mode) == 0o700


def test_worklist_command(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = NodeDB(state / "osteoscreen.sqlite")
    noon = dt.datetime.combine(dt.date.today(), dt.time(12)).timestamp()
    _job(db, 1, {"category_id": "screen_positive", "patient_id": "P1"}, noon)
    db.close()
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nstate_dir = "{state}"\n[worklist]\nat = "23:59"\n')
    today = dt.date.today().isoformat()  # the list covers the 24 h before today 23:59
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "worklist", "--config", str(cfg), "--date", today],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"worklist-{today}.csv (1 positive screen(s)" in r.stdout
