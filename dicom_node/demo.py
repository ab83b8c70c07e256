"""`osteoscreen demo`: the whole path on embedded defaults, end to end, on loopback.

PACS (Orthanc if installed, else a built-in storage SCP) <- SR + SC <- node <- CT by
C-STORE (DCMTK storescu if installed, else pynetdicom) + one ORU^R01 over MLLP.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from config import settings_from_dict
from dicom_node.pacs import BuiltinPACS, OrthancPACS, free_port, orthanc_binary
from dicom_node.sample import demo_oru_message, write_sample_series
from dicom_node.service import Service
from hl7.client import MLLPClient, ack_code

SENDER_AET = "DEMO-CT"


class DemoFailure(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def send_series(files: list[Path], host: str, port: int, called_aet: str, calling_aet: str) -> str:
    """C-STORE all files in one association; DCMTK storescu when installed."""
    storescu = shutil.which("storescu")
    if storescu:
        env = dict(os.environ, TCP_NODELAY="1")
        cmd = [storescu, "-aet", calling_aet, "-aec", called_aet, "-xs", "--max-pdu", "131072",
               host, str(port), *map(str, files)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise DemoFailure("send CT", f"storescu exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return "DCMTK storescu"
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise DemoFailure("send CT", "association with the node failed")
    try:
        import pydicom

        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            if not status or status.Status != 0:
                raise DemoFailure("send CT", f"C-STORE of {f.name} returned {getattr(status, 'Status', None)}")
    finally:
        assoc.release()
    return "pynetdicom"


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise DemoFailure(what, f"not done within {timeout_s:.0f} s")


def run_demo(output: Path | None = None, workdir: Path | None = None, timeout_s: float = 240.0) -> int:
    t0 = time.monotonic()
    succeeded = False
    work = Path(workdir or tempfile.mkdtemp(prefix="osteoscreen-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(output) if output else work / "output"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=work / "osteoscreen.log", level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"osteoscreen demo: working in {work}")
    pacs = OrthancPACS(work / "pacs") if orthanc_binary() else BuiltinPACS(work / "pacs")
    service = None
    try:
        try:
            pacs.start()
        except Exception as exc:  # noqa: BLE001
            raise DemoFailure("start PACS", str(exc)) from None
        print(f"  PACS: {pacs.describe()}")
        settings = settings_from_dict({
            "node": {"ae_title": "OSTEOSCREEN", "host": "127.0.0.1", "port": free_port(),
                     "state_dir": str(work / "state"), "series_quiet_s": 2.0,
                     "allowed_calling_aets": [SENDER_AET]},
            "hl7": {"host": "127.0.0.1", "port": free_port()},
            "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
            "export": {"retry_initial_s": 1.0, "retry_max_s": 10.0},
            "metrics": {"port": 0},  # a free port: never collide with a node running on this host
        })
        service = Service(settings)
        service.start()
        print(f"  node: OSTEOSCREEN@127.0.0.1:{service.scp.port}, HL7 MLLP 127.0.0.1:{service.mllp.bound_port}")

        study_day = dt.date.today()
        series = write_sample_series(work / "input", study_date=study_day)
        oru = demo_oru_message(dt.datetime.combine(study_day, dt.time(9, 0)))
        with MLLPClient("127.0.0.1", service.mllp.bound_port) as client:
            code = ack_code(client.send(oru))
        if code != "AA":
            raise DemoFailure("send labs", f"ORU^R01 acknowledged {code}")
        print(f"  labs: ORU^R01 for patient {series.patient_id} sent over MLLP, ACK {code}")

        how = send_series(series.files, "127.0.0.1", service.scp.port, "OSTEOSCREEN", SENDER_AET)
        print(f"  CT: {len(series.files)} slices sent with {how} (real CT, TotalSegmentator example_ct)")

        def job_finished() -> bool:
            jobs = service.db.jobs()
            return bool(jobs) and all(j.state in ("done", "failed") for j in jobs)

        _wait(job_finished, timeout_s, "screening job")
        job = service.db.jobs()[0]
        if job.state != "done" or job.outcome != "screened":
            raise DemoFailure("screening", job.last_error or (job.result or {}).get("reason") or job.state)
        _wait(lambda: all(r.state == "sent" for r in service.db.outbox()) and service.db.outbox(), timeout_s,
              "export to PACS")
        result = job.result or {}
        for row in service.db.outbox():
            shutil.copyfile(row.path, out / Path(row.path).name)
        shutil.copyfile(Path(service.db.outbox()[0].path).with_name("sc.png"), out / "sc.png")
        if isinstance(pacs, OrthancPACS):
            n = len(pacs.get("/instances"))  # type: ignore[arg-type]
            where = f"{pacs.describe()}, {n} instances there"
        else:
            where = f"{pacs.describe()}, {len(pacs.files())} files"
        labs = ", ".join(f"{v['name']} {v['value']:.3g} {v['unit']}" for v in result.get("labs_used", [])) or "none"
        print()
        print(f"  SR + SC sent to {where}")
        if "mean_hu" in result:
            print(f"  L1 trabecular attenuation: {result['mean_hu']:.1f} HU (SD {result['sd_hu']:.1f}, "
                  f"ROI {result['roi_area_mm2']:.0f} mm2) on "
                  f"{result.get('slice_label') or 'slice ' + str(result['slice_index'] + 1)}: "
                  f"{result['attenuation_category']} ({result['attenuation_rule']})")
        else:
            print(f"  image not used: {result.get('image_note')}")
        print(f"  category: {result['category']} - probability {result['probability']:.3g} "
              f"(operating point {result['threshold']:.3g}; {result['model']}, modalities "
              f"{'+'.join(result['modalities'])})")
        top = sorted(result.get("shap", {}).items(), key=lambda kv: -abs(kv[1]))[:4]
        if top:
            from pipeline.features import FEATURES

            label = {f.name: f.label for f in FEATURES}
            print("  largest SHAP contributions: " + ", ".join(f"{label.get(k, k)} {v:+.3f}" for k, v in top))
        print(f"  labs found: {labs}")
        print(f"  files: {out / 'sr.dcm'}, {out / 'sc.dcm'}, {out / 'sc.png'}")
        print("  RESEARCH USE ONLY - not for diagnostic use")
        hu = f"L1 {result['mean_hu']:.0f} HU, " if "mean_hu" in result else ""
        print(f"demo ok: {hu}{result['category']} (p={result['probability']:.3g}), "
              f"{len(result.get('labs_used', []))} labs, SR+SC delivered to {pacs.kind} "
              f"in {time.monotonic() - t0:.0f} s")
        succeeded = True
        return 0
    except DemoFailure as exc:
        print(f"demo failed: {exc.stage}: {exc.reason} (log: {work / 'osteoscreen.log'})")
        return 1
    except Exception as exc:  # noqa: BLE001
        logging.exception("demo failed")
        print(f"demo failed: {type(exc).__name__}: {exc} (log: {work / 'osteoscreen.log'})")
        return 1
    finally:
        if service:
            service.stop()
        pacs.stop()
        if succeeded and workdir is None and output is not None:
            # the temporary node state (received CT, databases, the patient-key secret) is not left behind;
            # after a failure it stays for its log
            shutil.rmtree(work, ignore_errors=True)
