"""`osteoscreen bench` parts that CI can afford: real peers, a small series, no timing assertions."""
from __future__ import annotations

import dataclasses

import pytest

from dicom_node.bench import (DURABLE_WRITES, NODE_AET, STORE_ALONE, BenchError, Ingest, Latency, Node, Storescp,
                              _fsyncs, cpu_ticks, durable_writes_alone, fsync_costs, reference_of, render_markdown,
                              send, send_concurrently, steal_share, store_alone, work_filesystem)
from dicom_node.cli import main
from dicom_node.sample import write_resampled_series

from conftest import need_tool


@pytest.fixture(scope="module")
def small_series(tmp_path_factory):
    return write_resampled_series(tmp_path_factory.mktemp("bench"), 40, matrix=64, tag="bench-test")


def test_osteoscreen_fsyncs_every_instance_and_storescp_does_not(small_series, tmp_path):
    need_tool("storescu")
    need_tool("storescp")
    n = len(small_series.files)
    with Node(tmp_path / "node") as node:
        fsyncs = _fsyncs(node.proc.pid, lambda: send(small_series.files, node.port, called=NODE_AET), n)
        assert node.stored() == n
    if fsyncs is None:
        pytest.skip("strace cannot attach here (no ptrace permission)")
    assert fsyncs >= 2.0  # instance file + its directory (+ the index commit)
    with Storescp(tmp_path) as scp:
        assert _fsyncs(scp.pid, lambda: send(small_series.files, scp.port, called="STORESCP"), n) == 0.0
        assert len(list((tmp_path / "storescp").iterdir())) == n


def test_bench_refuses_a_series_the_router_would_skip(capsys):
    assert main(["bench", "--slices", "10"]) == 2
    assert "--slices" in capsys.readouterr().err


def test_forking_storescp_takes_concurrent_associations(small_series, tmp_path):
    """The bench's multi-process reference: the packaged storescp accepts --fork and, with the bench's
    concurrent senders, writes every file."""
    need_tool("storescu")
    need_tool("storescp")
    halves = [dataclasses.replace(small_series, files=small_series.files[:20]),
              dataclasses.replace(small_series, files=small_series.files[20:])]
    with Storescp(tmp_path, fork=True) as scp:
        send_concurrently(halves, scp.port, called="STORESCP")
    assert len(list((tmp_path / "storescp").iterdir())) == len(small_series.files)


def test_store_alone_stores_every_instance_durably_through_the_node_store(small_series, tmp_path):
    """The bench's no-network reference runs the node's own store: every instance file under its final name and
    indexed; a second series with the same instances is all duplicates and still counts as stored."""
    halves = [dataclasses.replace(small_series, files=small_series.files[:20]),
              dataclasses.replace(small_series, files=small_series.files[20:])]
    assert store_alone(halves, tmp_path / "alone") > 0
    stored = [p for p in (tmp_path / "alone" / "instances").rglob("*.dcm")]
    assert len(stored) == len(small_series.files)
    assert not list((tmp_path / "alone" / "instances").rglob(".incoming.*"))
    with pytest.raises(BenchError, match="indexed 20 of 40"):
        store_alone([halves[0], halves[0]], tmp_path / "again")


def test_durable_writes_alone_writes_every_file_under_its_final_name(small_series, tmp_path):
    """The durability floor writes the same bytes, one file per instance, nothing half-written left."""
    halves = [dataclasses.replace(small_series, files=small_series.files[:20]),
              dataclasses.replace(small_series, files=small_series.files[20:])]
    assert durable_writes_alone(halves, tmp_path / "floor") > 0
    written = sorted((tmp_path / "floor" / "instances").rglob("*.dcm"))
    assert len(written) == len(small_series.files)
    assert sorted(p.read_bytes() for p in written) == sorted(p.read_bytes() for p in small_series.files)
    assert not list((tmp_path / "floor" / "instances").rglob(".incoming.*"))


def test_report_states_the_store_alone_ceiling_the_fsync_costs_and_the_steal(tmp_path):
    """The rendered report carries the measured figures it is given, the two summary lines unchanged."""
    costs = fsync_costs(tmp_path, n=3, size=64 * 1024)
    assert costs["new_file_ms"] > 0 and costs["overwrite_4k_ms"] > 0 and not list(tmp_path.iterdir())
    before = cpu_ticks()
    steal = steal_share(before, cpu_ticks())
    assert steal is None or 0.0 <= steal <= 1.0
    rates = {"storescp": 1000.0, "storescp + sync": 800.0, "orthanc (TCP_NODELAY=1)": 200.0, "osteoscreen": 450.0,
             "storescp --fork, 4 concurrent senders": 1400.0, "osteoscreen, 4 concurrent senders": 700.0,
             f"{STORE_ALONE}, 4 processes": 750.0, f"{DURABLE_WRITES}, 4 processes": 1250.0,
             "storescp, jpeg-ls": 1200.0, "osteoscreen, jpeg-ls": 420.0}
    ingest = Ingest(rates=rates, mb_s={k: v / 2 for k, v in rates.items()},
                    fsyncs_per_instance={"storescp": 0.0, "osteoscreen": 3.0},
                    fsync_ms={"new_file_ms": 0.47, "overwrite_4k_ms": 0.06},
                    round_ratios={f"{STORE_ALONE}, 4 processes": [0.81, 0.7, 0.755]})
    lat = Latency(slices=300, seconds=2.3, quiet_s=2.0, stages={"load/decode": 0.6}, service_rss_mb=200,
                  worker_rss_mb=450, receiver_rss_mb=70, level="L1", mean_hu=106.5, total_rss_mb=910, runs=5)
    summary = {"inst_s": 450, "ratio_storescp": 0.45, "ratio_storescp_sync": 0.56, "ratio_orthanc": 2.25,
               "concurrent4_ratio": 0.70}
    rep = {"ingest": ingest, "summary": summary, "latency": lat, "scaling": [lat], "runs": 5, "slices": 300,
           "hl7": {"msgs_s": 2000, "p50_ms": 0.4, "p99_ms": 0.7},
           "inference": {"backend": "onnxruntime-cpu", "predict_ms": 0.2, "shap_ms": 0.3,
                         "engines": {"table": "| t |", "line": "engines bench: backends=2"}},
           "ingest_line": "ingest: inst_s=450 ratio_storescp=0.45 ratio_storescp_sync=0.56 ratio_orthanc=2.25 "
                          "concurrent4_ratio=0.70",
           "latency_line": "latency: slices=300 seconds=2.3 peak_rss_mb=450", "minutes": 7.0, "steal": 0.22}
    text = render_markdown(rep)
    assert f"| {STORE_ALONE}, 4 processes | 750 | 375 | 0.75 | 0.70-0.81 |" in text
    assert "| osteoscreen | 450 | 225 | 0.45 | - |" in text
    # a compressed series against storescp on that series (420 / 1200), not on the uncompressed one
    assert "| osteoscreen, jpeg-ls | 420 | 210 | 0.35 (vs storescp, jpeg-ls) | - |" in text
    assert "| storescp, jpeg-ls | 1200 | 600 | 1.20 | - |" in text
    assert "| 300 | 5 | 2.3 | 200 | 450 | 70 | 910 | L1 | 106.5 |" in text
    assert "It reached 0.75 x storescp's single-sender rate, against 0.70 for the 4 senders" in text
    assert "It reached 1.25 x storescp's single-sender rate. The 4-sender bar (1.0 x) thus asks a durable " \
           "receiver for 80% of what bare durable writes reach here" in text
    assert "new 0.5 MB file took 0.47 ms" in text and "overwriting 4 KiB 0.06 ms" in text
    assert "CPU steal during the run: 22%" in text
    assert text.count(rep["ingest_line"]) == 1 and text.count(rep["latency_line"]) == 1


def test_each_row_is_compared_with_storescp_on_its_own_series_and_a_ram_disk_is_refused(tmp_path):
    assert reference_of("osteoscreen, j2k") == "storescp, j2k" and reference_of("storescp, j2k") == "storescp"
    assert reference_of("osteoscreen, 4 concurrent senders") == "storescp" == reference_of("osteoscreen")
    assert "at" in work_filesystem(tmp_path)
    mounts = [line.split() for line in open("/proc/self/mounts")]
    ram = next((m[1] for m in mounts if m[2] == "tmpfs" and m[1] in ("/dev/shm", "/run", "/tmp")), None)
    if ram is None:
        pytest.skip("no tmpfs mount to try")
    with pytest.raises(BenchError, match="fsync costs nothing"):
        work_filesystem(__import__("pathlib").Path(ram))
