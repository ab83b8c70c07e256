"""Series completion and the job lifecycle under races (review of 2026-12-07), on a real database."""
from __future__ import annotations

import threading
import time
import types

import pytest

from dicom_node.completion import SeriesCompletion, SeriesReady
from dicom_node.db import NodeDB, SeriesPurging
from tests.conftest import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture()
def db(tmp_path):
    d = NodeDB(tmp_path / "n.sqlite")
    yield d
    d.close()


def _index(db: NodeDB, sop: str, series: str = "1.2", patient: str = "P") -> bool:
    return db.index_instance(sop_uid=sop, sop_class=CT, study_uid="1.1", series_uid=series, path=f"/x/{sop}.dcm",
                             transfer_syntax="1.2.840.10008.1.2.1", calling_aet="CT1", patient_id=patient,
                             issuer="H", modality="CT")


def test_a_result_of_a_series_reopened_during_its_job_is_never_recorded_or_sent(db):
    """A late instance (or a patient identity update) reopened the series while its job ran; the job ended within
    the quiet period and its result, perhaps with another patient's labs, was queued for the PACS."""
    for i in range(3):
        _index(db, f"9.{i}")
    job = db.decide_series("1.2", True, "CT axial")
    assert db.claim_job().id == job
    _index(db, "9.99")  # late instance: the series is receiving again
    assert not db.finish_job(job, "screened", {"category": "without 9.99"}, [("pacs", "/r/sr.dcm", SR, "5.5")])
    assert db.outbox() == [] and db.job(job).state == "pending"
    assert db.claim_job() is None  # waits for the series' new decision
    db.decide_series("1.2", True, "CT axial")
    assert db.claim_job().id == job
    db.identity_update("1.2", "NEW", "H", "identity changed on re-send")
    assert not db.finish_job(job, "screened", {"category": "old patient"}, [("pacs", "/r/sr2.dcm", SR, "5.6")])
    assert db.outbox() == []


def test_an_instance_indexed_while_the_series_is_routed_is_decided_with_it(db):
    """Routing read 3 paths, a 4th instance was indexed meanwhile, and the decision ('3 slices, fewer than 4')
    overwrote the reopened state: the series was never decided with its 4th instance."""
    import dicom_node.service as service
    from dicom_node.routing import Decision

    for i in range(3):
        _index(db, f"7.{i}", "3.4")
    seen = []

    def facts(paths, _aet):
        if len(seen) == 0:
            _index(db, "7.3", "3.4")  # arrives during routing
        seen.append(len(paths))
        return len(paths)

    node = types.SimpleNamespace(db=db, settings=types.SimpleNamespace(routing=None, xray=None),
                                 jobs=types.SimpleNamespace(wake=lambda: None))
    original = service.series_facts, service.decide
    service.series_facts = facts
    service.decide = lambda n, _r, _x: Decision(n >= 4, f"{n} slices")
    try:
        service.Service.on_series_ready(node, SeriesReady("3.4", 10, None))
        assert db.series("3.4").state == "receiving"  # not decided on 3 of 4
        service.Service.on_series_ready(node, SeriesReady("3.4", 10, None))  # the 4th instance's own timer
    finally:
        service.series_facts, service.decide = original
    assert seen == [3, 4] and db.series("3.4").state == "decided" and db.series("3.4").eligible


def test_a_completion_timer_armed_while_the_last_one_runs_still_fires():
    """A timer armed during on_ready re-used the series UID as its APScheduler id, was skipped (max_instances)
    and dropped while the series stayed marked armed: never decided."""
    fired = []
    routing = threading.Event()

    def on_ready(ready):
        fired.append(ready.series_uid)
        if len(fired) == 1:
            routing.set()
            time.sleep(0.8)  # slow routing

    c = SeriesCompletion(0.2, on_ready)
    c.start()
    try:
        c.touch("S")
        assert routing.wait(5)  # the first timer fired; on_ready runs (a fixed sleep raced a loaded scheduler)
        c.touch("S")  # an instance during routing: a new timer, due while on_ready still runs
        wait_for(lambda: len(fired) >= 2, 5, "the second timer", interval=0.05)
    finally:
        c.stop()
    assert fired == ["S", "S"]


def test_a_failing_on_ready_is_tried_again_not_left_undecided():
    calls = []

    def on_ready(ready):
        calls.append(ready.series_uid)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    c = SeriesCompletion(0.1, on_ready)
    c.start()
    try:
        c.touch("S")
        wait_for(lambda: len(calls) >= 2, 5, "routing tried again", interval=0.05)
    finally:
        c.stop()
    assert calls == ["S", "S"]


def test_an_identity_update_during_a_purge_is_refused_not_acknowledged_and_deleted(db):
    _index(db, "9.0")
    db.decide_series("1.2", False, "skipped")
    with db._tx() as tx:
        tx.execute("UPDATE series SET state='purging' WHERE series_uid='1.2'")
    with pytest.raises(SeriesPurging):
        db.identity_update("1.2", "NEW", "H", "identity changed")
    assert db.series("1.2").state == "purging"
