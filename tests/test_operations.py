"""What IT watches: Prometheus metrics after real traffic, the audit trail of one study, PHI-free logs."""
from __future__ import annotations

import csv
import hashlib
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import urllib.request

import pydicom
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage

from dicom_node.sample import SAMPLE_ISSUER, SAMPLE_PATIENT_ID
from hl7.privacy import load_site_key, patient_key
from tests.conftest import DATA, storescu, wait_for
from tests.test_end_to_end import _send_crafted, results_in, send_labs


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_one_screened_study_moves_the_metrics_leaves_an_audit_trail_and_no_phi_in_logs(node_factory, orthanc,
                                                                                       sample_series):
    node = node_factory(destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}],
                        extra="[logging]\nlevel = \"DEBUG\"\nformat = \"json\"\n").start()
    before = scrape(node.metrics_port)
    assert before['osteoscreen_queue_depth{queue="jobs_pending"}'] == 0
    # the configured backend and the one `auto` resolved to here
    assert 'osteoscreen_engine_info{attenuation_rule="pickhardt_l1_2013",backend="auto",' \
           'backend_in_use="onnxruntime-cpu",model="fused_kdamm_v1",selector="drlis_v1"}' in before
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    send_labs(node, dt.datetime.strptime(study.StudyDate, "%Y%m%d").date())
    assert storescu(sample_series.files, node.port).returncode == 0
    wait_for(lambda: (lambda a: a if a[0] and a[1] else None)(results_in(orthanc)), 180, "SR and SC in Orthanc")
    wait_for(lambda: scrape(node.metrics_port).get('osteoscreen_outbox_sent_total{destination="pacs"}', 0) >= 2,
             30, "outbox metrics")
    m = scrape(node.metrics_port)
    n = len(sample_series.files)
    assert m['osteoscreen_instances_received_total{calling_ae="CT1",duplicate="False"}'] == n
    assert m["osteoscreen_series_completed_total"] == 1
    assert m['osteoscreen_series_routed_total{decision="screen",rule="eligible"}'] == 1
    assert m['osteoscreen_jobs_finished_total{outcome="screened"}'] == 1
    assert m['osteoscreen_job_stage_seconds_count{stage="model"}'] == 1
    assert any(k.startswith("osteoscreen_inference_seconds_count{backend=") for k in m)
    assert m['osteoscreen_hl7_acks_total{code="AA"}'] == 1
    assert m['osteoscreen_queue_depth{queue="outbox_pending"}'] == 0
    # A refused instance (a real slice with its UIDs blanked) is counted by its status, and audited.
    ds = pydicom.dcmread(sorted((DATA / "example_ct_dicom").iterdir())[0])
    ds.decompress()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID = ""
    assert _send_crafted(node.port, ds, ds.SOPInstanceUID).Status == 0xA900
    assert scrape(node.metrics_port)['osteoscreen_instances_refused_total{status="0xA900"}'] == 1

    audit = sqlite3.connect(node.state_dir / "osteoscreen.sqlite").execute(
        "SELECT kind, detail FROM audit ORDER BY id").fetchall()
    kinds = [k for k, _ in audit]
    for expected in ("received", "routing", "labs", "job", "export", "refused"):
        assert expected in kinds, f"no {expected!r} audit entry in {kinds}"
    assert any(k == "job" and d.startswith("screened") for k, d in audit)

    node.stop()
    log = node.log()
    assert "job 1 screened" in log  # the log is not empty: the scan below means something
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is one JSON object
    key = patient_key(SAMPLE_PATIENT_ID, SAMPLE_ISSUER, key=load_site_key(node.state_dir, create=False))
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "patient-key", SAMPLE_PATIENT_ID, "--issuer",
                        SAMPLE_ISSUER, "--config", str(node.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == key, r.stdout + r.stderr  # what IT runs to find the lines
    job_lines = [x for x in lines if x.get("job_id") == 1]
    assert {x["role"] for x in job_lines} == {"main", "worker"}  # the worker's lines carry the job too
    assert all(x.get("patient_key") == key for x in job_lines)
    assert any("screened" in x["msg"] for x in job_lines)
    for phi in (str(study.PatientName), SAMPLE_PATIENT_ID, study.PatientBirthDate):
        assert phi and phi not in log, f"{phi!r} appears in the node log"


def test_shadow_mode_delivers_only_to_qa_and_exports_predictions(node_factory, orthanc, sample_series, tmp_path):
    from dicom_node.pacs import free_port

    clinical_port = free_port()  # the clinical PACS: must never be called in shadow mode
    node = node_factory(
        destinations=[{"name": "clinical", "ae_title": "CLINPACS", "port": clinical_port},
                      {"name": "qa", "ae_title": orthanc.aet, "port": orthanc.dicom_port}],
        extra=f'[shadow]\nenabled = true\ndestinations = ["qa"]\n[followup]\nenabled = true\nport = {free_port()}\n'
              'send_for = "all"\n').start()
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    send_labs(node, dt.datetime.strptime(study.StudyDate, "%Y%m%d").date())
    assert storescu(sample_series.files, node.port).returncode == 0
    wait_for(lambda: (lambda a: a if a[0] and a[1] else None)(results_in(orthanc)), 180, "SR and SC in the QA PACS")
    with sqlite3.connect(node.state_dir / "osteoscreen.sqlite") as c:
        destinations = {r[0] for r in c.execute("SELECT destination FROM outbox")}
    assert destinations == {"qa"}  # no clinical PACS, no follow-up ORU to the RIS
    assert "SHADOW MODE" in node.log()
    out = tmp_path / "predictions.csv"
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "predictions", "--config", str(node.config),
                        "--out", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "1 result(s)" in r.stdout, r.stdout + r.stderr
    rows = list(csv.DictReader(out.open()))
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert len(rows) == 1 and rows[0]["patient_id"] == SAMPLE_PATIENT_ID and rows[0]["status"] == "screened"
    assert 0 <= float(rows[0]["probability"]) <= 1 and rows[0]["level"] == "L1"
    assert rows[0]["slice_selection"]
    assert (rows[0]["path"], rows[0]["experimental"], rows[0]["shadow"]) == ("ct", "no", "yes")


def _serve(config, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_a_second_node_on_the_same_state_directory_is_refused_and_leaves_the_first_alone(node_factory):
    node = node_factory().start()
    second = _serve(node.config)
    assert second.returncode == 1
    assert f"another osteoscreen (pid {node.proc.pid}) is using the state directory" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert node.proc.poll() is None and "resuming" not in node.log()
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "echo", f"OSTEOSCREEN@127.0.0.1:{node.port}",
                        "--aet", "CT1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_busy_hl7_port_is_named_without_a_traceback(node_factory):
    import socket

    node = node_factory()
    with socket.create_server(("127.0.0.1", node.hl7_port)):
        r = _serve(node.config)
    assert r.returncode == 1
    out = r.stderr + r.stdout
    assert f"cannot listen for HL7 on 127.0.0.1:{node.hl7_port}" in out
    assert "Traceback" not in out and "Scheduler is not running" not in out


def test_a_damaged_database_is_named_by_start_and_by_the_admin_commands(node_factory, tmp_path):
    node = node_factory()
    node.state_dir.mkdir(parents=True)
    db = node.state_dir / "osteoscreen.sqlite"
    db.write_bytes(b"this is not an SQLite file" * 100)
    r = _serve(node.config)
    assert r.returncode == 1 and f"node database {db}: file is not a database" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for command in (["status"], ["jobs", "list"], ["backup", "--dest", str(tmp_path / "bk")]):
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", *command, "--config", str(node.config)],
                           capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and str(db) in out and "Traceback" not in out, (command, out)
    assert not list((tmp_path / "bk").glob("osteoscreen-*"))  # no half backup left behind


def test_an_unwritable_worklist_directory_stops_the_start_naming_the_setting(node_factory, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    node = node_factory(extra=f'[worklist]\nenabled = true\ndirectory = "{blocker / "worklist"}"\n')
    r = _serve(node.config)
    assert r.returncode == 1
    assert f"[worklist] directory = {blocker / 'worklist'}: not writable" in r.stderr and "ReadWritePaths" in r.stderr


# --- review of the operations path (2026-12-07) ---------------------------------------------------------------
def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_patient_keys_are_keyed_with_a_private_site_secret_made_once(tmp_path):
    import stat

    from hl7.privacy import SECRET_NAME

    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nstate_dir = "{state}"\n')
    r = _cli("patient-key", "0734512", "--issuer", "HOSP", "--config", str(cfg))
    assert r.returncode == 2 and "no patient-key secret" in r.stdout and "first start" in r.stdout  # none made here
    secret = load_site_key(state)
    assert len(secret) == 32 and stat.S_IMODE((state / SECRET_NAME).stat().st_mode) == 0o600
    assert load_site_key(state) == secret  # reused, never replaced
    key = patient_key("0734512", "HOSP", key=secret)
    assert key.startswith("pk-") and len(key) == 15
    assert key != patient_key("0734512", "HOSP", key=b"another site's secret 0123456789")
    # The unkeyed hash of issuer|ID (what a log reader could recompute for every 7-digit MRN) is not the key.
    assert key[3:] != hashlib.sha256(b"HOSP|0734512").hexdigest()[:12]
    r = _cli("patient-key", "0734512", "--issuer", "HOSP", "--config", str(cfg))
    assert r.returncode == 0 and r.stdout.strip() == key, r.stdout + r.stderr


def test_admin_commands_name_unusable_paths_and_targets_in_one_line(tmp_path):
    from dicom_node.db import NodeDB

    state = tmp_path / "state"
    NodeDB(state / "osteoscreen.sqlite").close()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nstate_dir = "{state}"\n[worklist]\ndirectory = "{a_file / "wl"}"\n')
    cases = [
        (["predictions", "--out", str(tmp_path)], str(tmp_path)),  # a folder
        (["predictions", "--out", str(a_file / "x.csv")], str(a_file)),  # under a file
        (["worklist"], str(a_file)),
        (["backup", "--dest", str(a_file)], str(a_file)),
        (["echo", "PACS@host:abc"], "'abc' is not a number"),
        (["echo", "PACS"], "AE@host:port"),
    ]
    for args, named in cases:
        r = _cli(*args, "--config", str(cfg)) if args[0] != "echo" else _cli(*args)
        out = r.stdout + r.stderr
        assert r.returncode in (1, 2) and named in out and "Traceback" not in out, (args, out)
        assert len(out.strip().splitlines()) == 1, (args, out)


def test_two_backups_in_the_same_second_get_two_folders(tmp_path):
    import datetime as dt

    from dicom_node.backup import backup_state
    from dicom_node.db import NodeDB

    state = tmp_path / "state"
    NodeDB(state / "osteoscreen.sqlite").close()
    now = dt.datetime(2026, 12, 7, 10, 0, 0)
    first = backup_state(state, tmp_path / "bk", now=now)[0].parent
    second = backup_state(state, tmp_path / "bk", now=now)[0].parent
    assert first.name == "osteoscreen-20261207T100000" and second.name == "osteoscreen-20261207T100000-2"


def test_error_texts_about_received_data_lose_their_quoted_values_in_log_lines():
    """Parsers quote the value they could not read (a name, an ID, a birth date): the log keeps the reason only."""
    from hl7.privacy import redact_values

    assert redact_values("Invalid value for VR PN: 'Smith^John'") == "Invalid value for VR PN: '\u2026'"
    assert redact_values('invalid literal for int() with base 10: "0734512x"') == \
        'invalid literal for int() with base 10: "\u2026"'
    assert redact_values("the patient's birth date b'19500101X' can't be read") == \
        "the patient's birth date b'\u2026' can't be read"
    assert redact_values("cannot parse dataset: no data") == "cannot parse dataset: no data"
