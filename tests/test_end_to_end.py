"""The whole path with real peers: DCMTK drives the node process, a real Orthanc receives the results."""
from __future__ import annotations

import datetime as dt
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.sample import demo_oru_message
from hl7.client import MLLPClient, ack_code
from tests.conftest import DATA, need_tool, storescu, wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def send_labs(node, study_date: dt.date) -> None:
    with MLLPClient("127.0.0.1", node.hl7_port) as c:
        assert ack_code(c.send(demo_oru_message(dt.datetime.combine(study_date, dt.time(9))))) == "AA"


def results_in(orthanc) -> tuple[list[dict], list[dict]]:
    return orthanc.instances_by_sop_class(SR_CLASS), orthanc.instances_by_sop_class(SC_CLASS)


def dciodvfy_errors(path: Path) -> list[str]:
    exe = need_tool("dciodvfy")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def test_echo_allowed_and_unknown_ae_refused(node_factory):
    echoscu = need_tool("echoscu")
    node = node_factory().start()
    ok = subprocess.run([echoscu, "-aet", "CT1", "-aec", "OSTEOSCREEN", "127.0.0.1", str(node.port)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([echoscu, "-aet", "STRANGER", "-aec", "OSTEOSCREEN", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr
    assert "association from STRANGER" in node.log() and "rejected" in node.log()


def test_node_answers_malformed_oru_and_keeps_the_connection(node_factory):
    node = node_factory().start()
    with MLLPClient("127.0.0.1", node.hl7_port) as c:
        assert ack_code(c.send(b"MSH|^~\\&|LIS|X|||20260101||ORU^R01|\rPID|1||\r")) == "AE"  # no control ID
        assert ack_code(c.send(demo_oru_message(dt.datetime(2026, 1, 5, 9), "NEXT1"))) == "AA"


def test_ct_in_sr_and_sc_out_to_orthanc(node_factory, orthanc, sample_series, tmp_path):
    node = node_factory(destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}]).start()
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    send_labs(node, dt.datetime.strptime(study.StudyDate, "%Y%m%d").date())
    r = storescu(sample_series.files, node.port)
    assert r.returncode == 0, r.stderr

    srs, scs = wait_for(lambda: (lambda a: a if a[0] and a[1] else None)(results_in(orthanc)), 180,
                        "SR and SC in Orthanc")
    assert len(srs) == 1 and len(scs) == 1
    sr_tags, sc_tags = srs[0]["tags"], scs[0]["tags"]
    for tags in (sr_tags, sc_tags):
        assert tags["PatientID"] == study.PatientID
        assert tags["StudyInstanceUID"] == study.StudyInstanceUID
        assert tags["SeriesInstanceUID"] != study.SeriesInstanceUID  # new series in the same study

    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr_path.write_bytes(orthanc.get_bytes(f"/instances/{srs[0]['id']}/file"))
    sc_path.write_bytes(orthanc.get_bytes(f"/instances/{scs[0]['id']}/file"))
    assert dciodvfy_errors(sr_path) == []
    assert dciodvfy_errors(sc_path) == []

    sr = pydicom.dcmread(sr_path)
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sample_series.files}
    items = list(_walk(sr.ContentSequence))
    attn = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "112031"]
    assert attn, "no attenuation measurement in the SR"
    site = [i for i in items if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeValue == "66794005"]
    assert site, "L1 finding site missing"
    scoord = [i for i in items if i.ValueType == "SCOORD"]
    assert scoord and scoord[0].GraphicType == "POLYLINE"
    ref = scoord[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert ref in source_uids
    texts = " ".join(i.TextValue for i in items if i.ValueType == "TEXT")
    assert "NOT FOR DIAGNOSTIC USE" in texts
    assert "age 67 y, sex F" in texts
    labs = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"]
    assert {i.ConceptNameCodeSequence[0].CodeValue for i in labs} >= {"17861-6", "6768-6"}
    assert all("ObservationDateTime" in i for i in labs)

    sc = pydicom.dcmread(sc_path)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ref
    assert sc.BurnedInAnnotation == "YES"

    # No PHI in the service log: neither the patient ID nor the name appears in any line.
    log = node.log()
    assert "job 1 screened" in log
    for phi in (study.PatientID, str(study.PatientName), str(study.PatientName).replace("^", " ")):
        assert phi not in log, f"{phi!r} found in the log"

    # IT commands on the live node's state
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True,
                           timeout=60)
        return r.returncode, r.stdout + r.stderr

    rc, text = cli("status", "--config", str(node.config))
    assert rc == 0 and "jobs: {'done': 1}" in text and "outbox: {'sent': 2}" in text, text
    rc, text = cli("jobs", "list", "--config", str(node.config))
    assert rc == 0 and "outcome=screened" in text
    rc, text = cli("outbox", "list", "--config", str(node.config))
    assert rc == 0 and text.count(": sent") == 2
    rc, text = cli("echo", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    assert rc == 0 and "OK" in text


def _walk(seq):
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _send_crafted(port: int, dataset: pydicom.Dataset, affected_uid: str) -> pydicom.Dataset:
    """C-STORE ``dataset`` with ``affected_uid`` in the request, whatever the dataset says.

    Neither storescu nor pynetdicom's send_c_store will send a dataset with a blank
    SOP Instance UID, but a modality can; so the DIMSE request is built by hand.
    """
    ae = AE("CT1")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOSCREEN")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = affected_uid
        req.Priority = 2
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, dataset)
        req.DataSet = io.BytesIO(buf.getvalue())
        cx = assoc._get_valid_context(CTImageStorage, ExplicitVRLittleEndian, "scu")
        assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_store does: pause its reactor
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        return rsp
    finally:
        assoc.release()


@pytest.mark.parametrize("blank", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_blank_uids_are_refused_and_nothing_stored(node_factory, blank):
    node = node_factory().start()
    # A real scanner slice whose UIDs were blanked by de-identification.
    ds = pydicom.dcmread(sorted((DATA / "example_ct_dicom").iterdir())[0])
    ds.decompress()
    ds.SOPClassUID = CTImageStorage
    uid = generate_uid()
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, generate_uid(), generate_uid()
    setattr(ds, blank, "")
    rsp = _send_crafted(node.port, ds, uid)
    assert rsp.Status != 0x0000 and rsp.Status >= 0xA000, hex(rsp.Status)
    names = {"SOPInstanceUID": "SOP Instance UID", "StudyInstanceUID": "Study Instance UID",
             "SeriesInstanceUID": "Series Instance UID"}
    refusals = [line for line in node.log().splitlines() if "refused" in line]
    assert any(f"{names[blank]} is missing" in line for line in refusals), refusals
    stored = [p for p in (node.state_dir / "instances").rglob("*") if p.is_file()]
    assert stored == []


def test_restart_after_sigkill_still_produces_the_result(node_factory, orthanc, sample_series):
    dest = [{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}]
    node = node_factory(destinations=dest, quiet_s=30).start()  # long quiet period: kill before it ends
    r = storescu(sample_series.files, node.port)
    assert r.returncode == 0, r.stderr  # every instance acknowledged
    node.kill()
    assert results_in(orthanc) == ([], [])
    node.proc = None
    restarted = type(node)(node.workdir, destinations=dest, quiet_s=1.5)
    restarted.start()
    try:
        srs, scs = wait_for(lambda: (lambda a: a if a[0] and a[1] else None)(results_in(orthanc)), 180,
                            "results after restart")
        assert len(srs) == 1 and len(scs) == 1
        assert "was receiving at shutdown" in restarted.log()
    finally:
        restarted.stop()


def test_multiframe_ct_in_sr_and_sc_out(node_factory, orthanc, sample_series, tmp_path):
    """A scanner that sends one multi-frame (Legacy Converted Enhanced) CT object: the SR and SC reference
    the measured frame of that object."""
    from dicom_node.sample import write_multiframe_series

    mf = write_multiframe_series(sample_series, tmp_path / "mf", tag="e2e-mf")
    node = node_factory(destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}]).start()
    r = storescu(mf.files, node.port, extra=("--required",))  # storescu's default list lacks this SOP class
    assert r.returncode == 0, r.stderr
    srs, scs = wait_for(lambda: (lambda a: a if a[0] and a[1] else None)(results_in(orthanc)), 180,
                        "SR and SC in Orthanc")
    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr_path.write_bytes(orthanc.get_bytes(f"/instances/{srs[0]['id']}/file"))
    sc_path.write_bytes(orthanc.get_bytes(f"/instances/{scs[0]['id']}/file"))
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []
    source = pydicom.dcmread(mf.files[0], stop_before_pixels=True)
    scoord = [i for i in _walk(pydicom.dcmread(sr_path).ContentSequence) if i.ValueType == "SCOORD"]
    ref = scoord[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert 1 <= int(ref.ReferencedFrameNumber) <= int(source.NumberOfFrames)
    sc_ref = pydicom.dcmread(sc_path).SourceImageSequence[0]
    assert sc_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(sc_ref.ReferencedFrameNumber) == int(ref.ReferencedFrameNumber)


def test_labs_pulled_from_the_lis_when_the_store_has_none(node_factory, sample_series):
    """No ORU was received for this patient: the node asks the LIS (QBP^Q11), and the job uses what it answers."""
    from tests.lis_simulator import LabPatient, LISSimulator

    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    day = dt.datetime.strptime(study.StudyDate, "%Y%m%d") - dt.timedelta(days=2)
    patient = LabPatient(study.PatientID, str(study.get("IssuerOfPatientID", "")), study.PatientBirthDate,
                         study.PatientSex, results=[
                             ("17861-6", "Calcium", "2.25", "mmol/L", "F", day.strftime("%Y%m%d0800")),
                             ("6768-6", "ALP", "95", "U/L", "F", day.strftime("%Y%m%d0800"))])
    with LISSimulator([patient]) as lis:
        node = node_factory(extra=f'[lis_query]\nenabled = true\nport = {lis.port}\nbudget_s = 5.0\n').start()
        r = storescu(sample_series.files, node.port)
        assert r.returncode == 0, r.stderr
        db = node.state_dir / "osteoscreen.sqlite"

        def done():
            with sqlite3.connect(db) as c:
                row = c.execute("SELECT state, result_json FROM jobs WHERE id=1").fetchone()
            return row if row and row[0] == "done" else None

        state, result = wait_for(done, 180, "job 1 done")
        assert len(lis.requests) == 1 and "QBP^Q11" in lis.requests[0] and study.PatientID in lis.requests[0]
    summary = json.loads(result)
    used = {v["loinc"]: v["value"] for v in summary["labs_used"]}
    assert used["17861-6"] == pytest.approx(2.25 * 4.008) and used["6768-6"] == pytest.approx(95)
    assert any("LIS query" in n and "found" in n for n in summary["labs_notes"])
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM audit WHERE kind='lis_query'").fetchone()[0] == 1
    assert study.PatientID not in node.log()


def _second_series(files, out: Path, tag: str) -> list[Path]:
    """The same slices as another series of the same study (new series and SOP Instance UIDs)."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=[tag, "series"])
    paths = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(i)])
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
        paths.append(out / f"{i:04d}.dcm")
    return paths


def test_second_series_gives_no_second_sr_and_a_changed_result_names_its_predecessor(node_factory, orthanc,
                                                                                   sample_series, tmp_path):
    node = node_factory(destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}]).start()
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    study_day = dt.datetime.strptime(study.StudyDate, "%Y%m%d")
    send_labs(node, study_day.date())
    db = node.state_dir / "osteoscreen.sqlite"

    def job_done(job_id: int):
        with sqlite3.connect(db) as c:
            row = c.execute("SELECT state, result_json FROM jobs WHERE id=?", (job_id,)).fetchone()
        return json.loads(row[1]) if row and row[0] == "done" else None

    assert storescu(sample_series.files, node.port).returncode == 0
    first = wait_for(lambda: job_done(1), 180, "job 1")
    wait_for(lambda: len(results_in(orthanc)[0]) == 1, 60, "first SR in Orthanc")

    # A second series of the same study, same labs: same result -> no second SR
    assert storescu(_second_series(sample_series.files, tmp_path / "s2", "dup-2"), node.port).returncode == 0
    second = wait_for(lambda: job_done(2), 180, "job 2")
    assert second["duplicate_of"] == first["sr_sop_instance_uid"]

    # Corrected labs (a new calcium value), then a third series: a new SR that names the first as predecessor
    with MLLPClient("127.0.0.1", node.hl7_port) as c:
        corrected = demo_oru_message(study_day.replace(hour=9), "CORR1").replace(
            b"|9.1|mg/dL|8.6-10.3|N|||F|", b"|8.2|mg/dL|8.6-10.3|L|||C|")
        assert ack_code(c.send(corrected)) == "AA"
    assert storescu(_second_series(sample_series.files, tmp_path / "s3", "dup-3"), node.port).returncode == 0
    third = wait_for(lambda: job_done(3), 180, "job 3")
    assert "duplicate_of" not in third and third["predecessor_sr"] == first["sr_sop_instance_uid"]
    srs = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(results_in(orthanc)[0]), 60, "second SR")
    newest = next(s for s in srs if s["tags"]["SOPInstanceUID"] == third["sr_sop_instance_uid"])
    path = tmp_path / "sr3.dcm"
    path.write_bytes(orthanc.get_bytes(f"/instances/{newest['id']}/file"))
    sr = pydicom.dcmread(path)
    pre = sr.PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == study.StudyInstanceUID
    assert pre.ReferencedSeriesSequence[0].SeriesInstanceUID == first["sr_series_uid"]
    assert pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        first["sr_sop_instance_uid"]
    assert dciodvfy_errors(path) == []
    assert int(sr.InstanceNumber) == 2  # the study's second SR sent: version 2
    assert len(results_in(orthanc)[0]) == 2


def test_followup_result_message_reaches_the_ris_through_the_outbox(node_factory, sample_series):
    """A positive screen produces an ORU^R01 for the RIS; while the RIS is down it waits in the outbox."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    from dicom_node.pacs import free_port
    from tests.lis_simulator import LISSimulator

    ris_port = free_port()
    node = node_factory(extra=f'[followup]\nenabled = true\nport = {ris_port}\nsend_for = "all"\n'
                              f'recommendation = "Consider DXA & review (research)"\n').start()
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    send_labs(node, dt.datetime.strptime(study.StudyDate, "%Y%m%d").date())
    assert storescu(sample_series.files, node.port).returncode == 0
    db = node.state_dir / "osteoscreen.sqlite"

    def outbox_row():
        with sqlite3.connect(db) as c:
            return c.execute("SELECT state, attempts, last_error, sop_instance_uid FROM outbox"
                             " WHERE destination='hl7:ris'").fetchone()

    row = wait_for(lambda: (lambda r: r if r and r[1] >= 1 else None)(outbox_row()), 180, "a failed first attempt")
    assert row[0] == "pending" and "cannot connect" in row[2]  # the RIS is down: kept, retried
    with LISSimulator([], port=ris_port) as ris:
        wait_for(lambda: outbox_row()[0] == "sent", 60, "result message sent")
        message = ris.results[0]
    assert len(ris.results) == 1
    parsed = parse_message(message.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.msh.msh_10.value == row[3]
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    segs = {s.split("|")[0] + s.split("|")[1]: s.split("|") for s in message.split("\r") if s.startswith(("PID", "OBX"))}
    assert segs["PID1"][3].split("^")[0] == study.PatientID
    with sqlite3.connect(db) as c:
        summary = json.loads(c.execute("SELECT result_json FROM jobs WHERE id=1").fetchone()[0])
    category = [s for k, s in segs.items() if k.startswith("OBX") and s[3].startswith("OS0001")][0]
    assert category[5].split("^")[0] == summary["category_id"]
    texts = " ".join(s[5] for k, s in segs.items() if k.startswith("OBX"))
    assert "RESEARCH USE ONLY" in texts and summary["sr_sop_instance_uid"] in texts
    if summary["category_id"] == "screen_positive":
        assert "Consider DXA \\T\\ review (research)" in texts  # '&' escaped as ER7 requires

    # Corrected labs, then the job screened again: a new SR (its own files: the first run's stay as sent) and a
    # corrected result message (OBR-25/OBX-11 'C') under a control ID of its own
    first_sr = next((node.state_dir / "results" / "job-000001" / "run-001").glob("sr.dcm"))
    first_sr_bytes = first_sr.read_bytes()
    study_day = dt.datetime.strptime(study.StudyDate, "%Y%m%d")
    with MLLPClient("127.0.0.1", node.hl7_port) as c:
        corrected = demo_oru_message(study_day.replace(hour=9), "CORR1").replace(
            b"|9.1|mg/dL|8.6-10.3|N|||F|", b"|8.2|mg/dL|8.6-10.3|L|||C|")
        assert ack_code(c.send(corrected)) == "AA"
    retry = subprocess.run([sys.executable, "-m", "dicom_node.cli", "jobs", "retry", "1", "--config",
                            str(node.config)], capture_output=True, text=True)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    with LISSimulator([], port=ris_port) as ris:
        wait_for(lambda: ris.results, 180, "the corrected result message")
        second = ris.results[0].replace("\n", "\r")
    parse_message(second, validation_level=VALIDATION_LEVEL.STRICT)
    fields = {s.split("|")[0] + s.split("|")[1]: s.split("|") for s in second.split("\r") if s.startswith(("MSH", "OBR", "OBX"))}
    assert fields["MSH^~\\&"][9] == row[3] + "-2"
    assert fields["OBR1"][25] == "C" and {s[11] for k, s in fields.items() if k.startswith("OBX")} == {"C"}
    with sqlite3.connect(db) as c:
        rerun = json.loads(c.execute("SELECT result_json FROM jobs WHERE id=1").fetchone()[0])
    assert rerun["predecessor_sr"] == summary["sr_sop_instance_uid"] and rerun["followup_corrects"] == row[3]
    assert first_sr.read_bytes() == first_sr_bytes  # never overwritten by the later run
    assert (node.state_dir / "results" / "job-000001" / "run-002" / "sr.dcm").is_file()


def test_kos_and_gsps_round_trip_through_orthanc(node_factory, orthanc, sample_series):
    node = node_factory(destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}],
                        extra="[results]\nkey_object_selection = true\npresentation_state = true\n").start()
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    assert storescu(sample_series.files, node.port).returncode == 0
    classes = {SR_CLASS: "SR", SC_CLASS: "SC", "1.2.840.10008.5.1.4.1.1.88.59": "KOS",
               "1.2.840.10008.5.1.4.1.1.11.1": "GSPS"}
    found = wait_for(lambda: (lambda f: f if len(f) == 4 else None)(
        {classes[c]: orthanc.instances_by_sop_class(c) for c in classes if orthanc.instances_by_sop_class(c)}),
        180, "SR, SC, KOS and GSPS in Orthanc")
    series = set()
    for kind, items in found.items():
        assert len(items) == 1, kind
        tags = items[0]["tags"]
        assert tags["StudyInstanceUID"] == study.StudyInstanceUID and tags["PatientID"] == study.PatientID
        series.add(tags["SeriesInstanceUID"])
    assert len(series) == 4 and study.SeriesInstanceUID not in series  # each in its own new series


def test_patient_identity_update_on_resend_is_followed(node_factory, orthanc, sample_series, tmp_path):
    """The PACS corrects the patient of a study and sends it again (same SOP Instance UIDs): the node re-screens
    it for the corrected patient, sends a new SR version with the new identity, and never uses the old labs."""
    node = node_factory(destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}]).start()
    study = pydicom.dcmread(sample_series.files[0], stop_before_pixels=True)
    send_labs(node, dt.datetime.strptime(study.StudyDate, "%Y%m%d").date())  # labs of the original patient
    db = node.state_dir / "osteoscreen.sqlite"

    def job_result():
        with sqlite3.connect(db) as c:
            row = c.execute("SELECT state, result_json FROM jobs WHERE id=1").fetchone()
        return json.loads(row[1]) if row and row[0] == "done" and row[1] else None

    assert storescu(sample_series.files, node.port).returncode == 0
    first = wait_for(job_result, 180, "first result")
    assert first["labs_used"]
    wait_for(lambda: len(results_in(orthanc)[0]) == 1, 60, "first SR")

    corrected = tmp_path / "corrected"
    corrected.mkdir()
    for f in sample_series.files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = "OS-DEMO-0002", "CORRECTED^PATIENT"
        ds.save_as(corrected / f.name, enforce_file_format=True)
    assert storescu(sorted(corrected.iterdir()), node.port).returncode == 0
    second = wait_for(lambda: (lambda r: r if r and r["sr_sop_instance_uid"] != first["sr_sop_instance_uid"]
                               else None)(job_result()), 180, "result for the corrected patient")
    assert second["patient_id"] == "OS-DEMO-0002" and second["labs_used"] == []  # the old patient's labs: never
    assert second["predecessor_sr"] == first["sr_sop_instance_uid"]
    srs = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(results_in(orthanc)[0]), 60, "second SR")
    assert {s["tags"]["PatientID"] for s in srs} == {study.PatientID, "OS-DEMO-0002"}
    with sqlite3.connect(db) as c:
        audit = [r[0] for r in c.execute("SELECT detail FROM audit WHERE kind='identity'")]
    assert len(audit) == 1 and "PatientID" in audit[0] and "PatientName" in audit[0]
    assert "OS-DEMO-0002" not in node.log() and "CORRECTED" not in node.log()
