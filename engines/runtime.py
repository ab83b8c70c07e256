"""Inference backends behind one interface: named numpy arrays in, named numpy arrays out.

``auto`` picks the first available of: TensorRT (an NVIDIA GPU and the ``tensorrt``
package), ONNX Runtime CUDA, ONNX Runtime CPU, PyTorch (the bundle's TorchScript files,
the reference implementation). ``pytorch-cuda`` (the reference on the GPU) and
``triton`` (a Triton Inference Server) are chosen only when forced. A forced backend that
is not available is an error at load time, never a silent fallback.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines import ort_backend
from engines.gpu import has_cuda_gpu
from engines.graph_io import read_io
from engines.options import EngineOptions, current

log = logging.getLogger("osteoscreen.engines")

AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "pytorch")
BACKENDS = ("auto", *AUTO_ORDER, "pytorch-cuda", "triton")
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "pytorch-cuda")
FP16_BACKENDS = ("tensorrt", "pytorch-cuda")  # ONNX Runtime would need an fp16 copy of the ONNX file


class EngineError(Exception):
    pass


@dataclass
class Engine:
    graph: str
    backend: str
    device: str
    precision: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    _session: object = field(repr=False)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise EngineError(f"{self.graph}: missing inputs {sorted(missing)}")
        feeds = {k: np.ascontiguousarray(inputs[k], dtype=np.float32) for k in self.input_names}
        outs = self._session.run(list(self.output_names), feeds)  # type: ignore[attr-defined]
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        close = getattr(self._session, "close", None)
        if close:
            close()


def _installed(module: str) -> bool:
    # find_spec, not import: importing torch or tensorrt costs seconds and is needed only if chosen
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends(options: EngineOptions | None = None) -> list[str]:
    """Backends that can run here, in ``auto`` order, then the forced-only ones."""
    prov = ort_backend.providers()
    gpu = has_cuda_gpu()
    out = []
    if gpu and _installed("tensorrt") and (_installed("cuda.bindings") or _installed("cuda.cudart")):
        out.append("tensorrt")
    if "CUDAExecutionProvider" in prov and gpu:
        out.append("onnxruntime-cuda")
    if "CPUExecutionProvider" in prov:
        out.append("onnxruntime-cpu")
    torch = _installed("torch")
    if torch:
        out.append("pytorch")
    if torch and gpu:
        out.append("pytorch-cuda")
    if _installed("tritonclient") and (options or current()).triton_url:
        out.append("triton")
    return out


def _why_unavailable(backend: str) -> str:
    return {
        "tensorrt": "needs an NVIDIA GPU and `pip install .[tensorrt]` (tensorrt, cuda-python)",
        "onnxruntime-cuda": "needs an NVIDIA GPU and onnxruntime-gpu in place of onnxruntime",
        "onnxruntime-cpu": "needs onnxruntime",
        "pytorch": "needs torch",
        "pytorch-cuda": "needs an NVIDIA GPU and a CUDA build of torch",
        "triton": "needs `pip install .[triton]` (tritonclient) and [engines] triton_url",
    }[backend]


def card_allows_fp16(onnx_path: Path) -> bool:
    from engines.bundle import BundleError, load_bundle

    try:
        card = load_bundle(onnx_path.parent).card.raw
    except BundleError:
        return False
    return bool(card.get("inference", {}).get("fp16", False))


def resolve_precision(backend: str, options: EngineOptions, fp16_allowed: bool) -> str:
    """fp16 only on a GPU backend and only where the card allows it; an explicit fp16 that the card
    forbids is an error (the card's authors measured that it changes answers)."""
    if options.precision == "fp16":
        if backend not in FP16_BACKENDS:
            raise EngineError(f"precision fp16 is available on {' and '.join(FP16_BACKENDS)}, not {backend}")
        if not fp16_allowed:
            raise EngineError("the model card does not allow fp16 for this network: use precision auto or fp32")
        return "fp16"
    # auto: fp16 on TensorRT only; PyTorch's autocast made the shipped (small) networks slower on an H100
    # (docs/benchmarks-gpu.md), so it runs fp16 only when asked for.
    if options.precision == "auto" and backend == "tensorrt" and fp16_allowed:
        return "fp16"
    return "fp32"


def load_graph(onnx_path: str | Path, backend: str = "auto", *, threads: int | None = None,
               options: EngineOptions | None = None, triton_model: str | None = None) -> Engine:
    """One network: ``onnx_path`` names the ONNX file; other backends find their files beside it."""
    path = Path(onnx_path)
    options = options or current()
    if not path.is_file():
        raise EngineError(f"model file {path} not found")
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    avail = available_backends(options)
    if backend == "auto":
        auto = [b for b in AUTO_ORDER if b in avail]
        if not auto:
            raise EngineError("no inference backend is available: install onnxruntime")
        chosen = auto[0]
    else:
        chosen = backend
        if chosen not in avail:
            raise EngineError(f"backend {backend} is not available here (available: {avail or 'none'}): "
                              f"it {_why_unavailable(backend)}")
    precision = resolve_precision(chosen, options, card_allows_fp16(path))
    io = read_io(path)
    try:
        session, device = _open(chosen, path, io.inputs, precision, options, threads, triton_model)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library has its own errors; the operator needs one message
        raise EngineError(f"backend {chosen} could not load {path.name}: {exc}") from exc
    return Engine(graph=path.stem, backend=chosen, device=device, precision=precision,
                  input_names=tuple(io.inputs), output_names=tuple(io.outputs), _session=session)


def _open(chosen: str, path: Path, inputs: dict, precision: str, options: EngineOptions, threads: int | None,
          triton_model: str | None) -> tuple[object, str]:
    if chosen in ("pytorch", "pytorch-cuda"):
        from engines.torch_backend import TorchScriptSession

        ts = path.with_suffix(".ts")
        if not ts.is_file():
            raise EngineError(f"backend {chosen} needs {ts.name} in the bundle (written by `osteoscreen train`)")
        device = "cuda" if chosen == "pytorch-cuda" else "cpu"
        sess = TorchScriptSession(ts, device=device, fp16=precision == "fp16", threads=threads or options.threads)
        if tuple(sess.input_names) != tuple(inputs):
            raise EngineError(f"{ts.name} takes {sess.input_names}, the ONNX file {tuple(inputs)}")
        return sess, device
    if chosen.startswith("onnxruntime"):
        cuda = chosen == "onnxruntime-cuda"
        return ort_backend.OrtSession(path, cuda=cuda, options=options, threads=threads), "cuda" if cuda else "cpu"
    if chosen == "tensorrt":
        from engines.tensorrt_backend import TensorRTSession

        return TensorRTSession(path, graph=f"{path.parent.name}__{path.stem}", fp16=precision == "fp16",
                               options=options, input_shapes=inputs), "cuda"
    from engines.triton_backend import TritonSession, model_name

    name = triton_model or model_name(path.parent.name, path.stem)
    return TritonSession(options.triton_url, options.triton_protocol, name, options.triton_timeout_s), \
        f"triton {options.triton_url}"


def load(bundle_dir: str | Path, backend: str = "auto", *, graph: str | None = None,
         threads: int | None = None, options: EngineOptions | None = None) -> Engine:
    """Load one network of a bundle (``graph`` names the ONNX file without suffix)."""
    bundle_dir = Path(bundle_dir)
    graphs = sorted(p.stem for p in bundle_dir.glob("*.onnx"))
    if not graphs:
        raise EngineError(f"{bundle_dir} holds no ONNX network")
    if graph is None:
        if len(graphs) > 1:
            raise EngineError(f"{bundle_dir} holds several networks {graphs}: name one with graph=")
        graph = graphs[0]
    if graph not in graphs:
        raise EngineError(f"{bundle_dir} has no network {graph!r} (has {graphs})")
    return load_graph(bundle_dir / f"{graph}.onnx", backend, threads=threads, options=options)
