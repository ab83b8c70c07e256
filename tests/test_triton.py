"""The Triton backend against a real Triton Inference Server (2.51, from the nvidia-pytriton wheel).

`make triton-server` (part of `make test`) unpacks the server; this test exports the shipped
networks with `osteoscreen engines export-triton`, serves them (Python backend: that server
build has no ONNX Runtime backend, see tests/triton_python_model.py), and checks the node's
HTTP and gRPC clients against the PyTorch reference, including batches Triton merges.
"""
from __future__ import annotations

import concurrent.futures as cf
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import engines
from dicom_node.pacs import free_port, stop_process
from engines.bundle import bundled_models_dir
from engines.graph_io import read_io
from engines.options import EngineOptions
from engines.parity import compare, random_inputs

ROOT = Path(__file__).resolve().parent.parent
TRITON = ROOT / ".cache" / "triton"
SERVER = TRITON / "server" / "pytriton" / "tritonserver"
GRAPHS = ("drlis_v1/qnet", "fused_kdamm_v1/image_encoder", "fused_kdamm_v1/head")
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
MAX_BATCH = 64  # the repository's max_batch_size
STALE = "stale__qnet"  # the qnet model, its configuration naming another ONNX hash (an older export)


def _site_packages() -> Path:
    found = sorted((TRITON / "env" / "lib").glob("python3*/site-packages"))
    if not found:
        pytest.skip("Triton test environment missing: run `make triton-server`")
    return found[0]


def _stale_copy(model_dir: Path, dst: Path) -> None:
    """The same model served under another name with another onnx_sha256 in its config.pbtxt."""
    shutil.copytree(model_dir, dst)
    cfg = (dst / "config.pbtxt").read_text()
    start = cfg.index('string_value: "') + len('string_value: "')
    cfg = cfg[:start] + "0" * 64 + cfg[start + 64:]
    (dst / "config.pbtxt").write_text(cfg.replace(f'name: "{model_dir.name}"', f'name: "{STALE}"'))


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    binary = SERVER / "bin" / "tritonserver"
    stub = SERVER / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        pytest.skip("no Triton server: run `make triton-server`")
    libs = TRITON / "server" / "nvidia_pytriton.libs"
    missing = subprocess.run(["ldd", str(stub)], capture_output=True, text=True,
                             env={"LD_LIBRARY_PATH": str(libs)}).stdout
    if "not found" in missing:
        pytest.skip(f"Triton's Python {PY} stub cannot load here: {missing.strip()}")
    work = tmp_path_factory.mktemp("triton")
    backend = work / "backends" / "python"
    backend.mkdir(parents=True)
    for f in (SERVER / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy(f, backend)
    shutil.copy(stub, backend)
    repo = work / "repo"
    from engines.triton_repo import export_repository

    template = (Path(__file__).parent / "triton_python_model.py").read_text()
    site = _site_packages()
    for model_dir in export_repository(repo, ["fused_kdamm_v1", "drlis_v1"], max_batch=MAX_BATCH,
                                       gpu=False):
        cfg = (model_dir / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in cfg
        (model_dir / "config.pbtxt").write_text(cfg.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
        (model_dir / "1" / "model.py").write_text(f"import sys\nsys.path.insert(0, {str(site)!r})\n" + template)
    _stale_copy(repo / "drlis_v1__qnet", repo / STALE)
    http, grpc = free_port(), free_port()
    log = (work / "tritonserver.log").open("w")
    proc = subprocess.Popen(
        [str(binary), "--model-repository", str(repo), "--backend-directory", str(work / "backends"),
         "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
         "--grpc-port", str(grpc), "--allow-metrics", "false"],
        stdout=log, stderr=subprocess.STDOUT, env={"LD_LIBRARY_PATH": str(libs), "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("Triton did not become ready:\n" + (work / "tritonserver.log").read_text()[-3000:])
            time.sleep(0.3)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"}
    finally:
        stop_process(proc)
        log.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_backend_agrees_with_the_reference(triton_server, protocol):
    pytest.importorskip("tritonclient")
    opts = EngineOptions(triton_url=triton_server[protocol], triton_protocol=protocol)
    for graph in GRAPHS:
        b, g = graph.split("/")
        onnx_path = bundled_models_dir() / b / f"{g}.onnx"
        eng = engines.load_graph(onnx_path, "triton", options=opts)
        ref = engines.load_graph(onnx_path, "pytorch")
        assert (eng.backend, eng.device) == ("triton", f"triton {triton_server[protocol]}")
        assert eng.precision == "fp32"  # what the served configuration runs (CPU instances: no TensorRT FP16)
        assert eng._session.max_batch == MAX_BATCH  # read from the served configuration
        feeds = random_inputs(read_io(onnx_path), 23, seed=7)
        p = compare(graph, "triton", "fp32", "random", eng(**feeds), ref(**feeds))
        assert p.ok, p.line()
        eng.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_call_larger_than_max_batch_size_runs_in_chunks(triton_server, protocol):
    """Exact SHAP sends 2^p x 8 rows in one call; Triton refuses a request over max_batch_size."""
    pytest.importorskip("tritonclient")
    opts = EngineOptions(triton_url=triton_server[protocol], triton_protocol=protocol)
    onnx_path = bundled_models_dir() / "fused_kdamm_v1" / "head.onnx"
    eng = engines.load_graph(onnx_path, "triton", options=opts)
    ref = engines.load_graph(onnx_path, "pytorch")
    feeds = random_inputs(read_io(onnx_path), 2 * MAX_BATCH + 13, seed=11)
    out = eng(**feeds)
    assert out["logit"].shape[0] == 2 * MAX_BATCH + 13
    p = compare("fused_kdamm_v1/head", "triton", "fp32", "random", out, ref(**feeds))
    assert p.ok, p.line()
    eng.close()


def test_a_served_model_built_from_another_onnx_file_is_refused(triton_server):
    pytest.importorskip("tritonclient")
    onnx_path = bundled_models_dir() / "drlis_v1" / "qnet.onnx"
    for protocol in ("http", "grpc"):
        opts = EngineOptions(triton_url=triton_server[protocol], triton_protocol=protocol)
        with pytest.raises(engines.EngineError, match=f"Triton model '{STALE}' .* serves another network .*"
                                                      "re-export the repository with `osteoscreen engines "
                                                      "export-triton`"):
            engines.load_graph(onnx_path, "triton", options=opts, triton_model=STALE)


def test_triton_serves_concurrent_requests_from_several_nodes(triton_server):
    """Dynamic batching: eight clients at once get their own answers back."""
    pytest.importorskip("tritonclient")
    onnx_path = bundled_models_dir() / "drlis_v1" / "qnet.onnx"
    ref = engines.load_graph(onnx_path, "pytorch")
    inputs = [random_inputs(read_io(onnx_path), 5, seed=s) for s in range(8)]

    def call(feeds):
        eng = engines.load_graph(onnx_path, "triton", options=EngineOptions(triton_url=triton_server["http"]))
        try:
            return eng(**feeds)["q"]
        finally:
            eng.close()

    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(call, inputs))
    for feeds, q in zip(inputs, outs):
        assert np.allclose(q, ref(**feeds)["q"], atol=1e-4, rtol=1e-4)


def test_unreachable_triton_or_unknown_model_is_a_clear_error(triton_server):
    pytest.importorskip("tritonclient")
    onnx_path = bundled_models_dir() / "drlis_v1" / "qnet.onnx"
    with pytest.raises(engines.EngineError, match="not reachable"):
        engines.load_graph(onnx_path, "triton", options=EngineOptions(triton_url=f"127.0.0.1:{free_port()}",
                                                                       triton_timeout_s=2))
    with pytest.raises(engines.EngineError, match="does not serve a ready model 'nope'"):
        engines.load_graph(onnx_path, "triton", options=EngineOptions(triton_url=triton_server["http"]),
                           triton_model="nope")
