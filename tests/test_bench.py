"""`osteoscreen bench` parts that CI can afford: real peers, a small series, no timing assertions."""
from __future__ import annotations

import dataclasses

import pytest

from dicom_node.bench import NODE_AET, Node, Storescp, _fsyncs, send, send_concurrently
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
