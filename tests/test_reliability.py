"""Faults inflicted on the real service: PACS outage, kill during pipeline work."""
import re
import time

from dicom_node.pacs import BuiltinPACS, OrthancPACS
from tests.conftest import need_tool, storescu, wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def test_pacs_outage_queues_with_backoff_and_other_destination_not_blocked(node_factory, sample_series, tmp_path):
    need_tool("Orthanc")
    orthanc = OrthancPACS(tmp_path / "orthanc")  # configured but not started: the PACS is down
    other = BuiltinPACS(tmp_path / "other")
    other.start()
    node = node_factory(destinations=[
        {"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port},
        {"name": "qa", "ae_title": other.aet, "port": other.dicom_port},
    ]).start()
    try:
        assert storescu(sample_series.files, node.port).returncode == 0
        # The healthy destination gets both objects although the PACS is away.
        wait_for(lambda: len(other.files()) == 2, 180, "results at the healthy destination")
        time.sleep(8)  # outage continues: retries must back off, not spin
        retries = [float(x) for x in re.findall(r"export of \S+ to pacs failed \(attempt \d+\), retry in ([0-9.]+) s",
                                                 node.log())]
        assert retries, "no retry logged"
        assert len(retries) <= 20, f"{len(retries)} attempts in the outage: busy loop?"
        per_object = retries[::2]
        assert per_object == sorted(per_object) and per_object[-1] > per_object[0], retries
        orthanc.start()  # the PACS comes back on the same port
        wait_for(lambda: len(orthanc.get("/instances")) == 2, 60, "SR + SC delivered after the outage")
        assert len(orthanc.instances_by_sop_class(SR_CLASS)) == 1
    finally:
        orthanc.stop()
        other.stop()


def test_kill_during_pipeline_work_delivers_exactly_once(node_factory, sample_series, tmp_path):
    need_tool("Orthanc")
    orthanc = OrthancPACS(tmp_path / "orthanc")
    orthanc.start()
    dest = [{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port}]
    node = node_factory(destinations=dest, quiet_s=0.5).start()
    try:
        assert storescu(sample_series.files, node.port).returncode == 0
        wait_for(lambda: "job 1 (series" in node.log(), 60, "job start")
        node.kill()  # SIGKILL while the worker is screening (or just after)
        restarted = type(node)(node.workdir, destinations=dest, quiet_s=0.5)
        restarted.start()
        try:
            wait_for(lambda: len(orthanc.get("/instances")) == 2, 180, "SR + SC after the restart")
            time.sleep(3)
            assert len(orthanc.get("/instances")) == 2  # same SOP Instance UIDs: a re-send is idempotent
        finally:
            restarted.stop()
    finally:
        orthanc.stop()
