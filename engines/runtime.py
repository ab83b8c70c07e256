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
from engines.bundle import BundleError, VerifiedFile, read_verified
from engines.gpu import has_cuda_gpu
from engines.graph_io import GraphIO, read_io
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
    input_shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)  # None: the batch dimension

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        feeds = {k: np.ascontiguousarray(inputs[k], dtype=np.float32) for k in self.input_names}
        outs = self._session.run(list(self.output_names), feeds)  # type: ignore[attr-defined]
        return dict(zip(self.output_names, outs))

    def expected(self) -> str:
        """The inputs this network takes, e.g. ``context (batch, 227)``."""
        return ", ".join(f"{n} ({', '.join('batch' if d is None else str(d) for d in self.input_shapes[n])})"
                         if n in self.input_shapes else n for n in self.input_names)

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Names, ranks and fixed dimensions as in the ONNX file, one batch size >= 1 shared by every input:
        otherwise an EngineError naming what the network takes (each backend would fail its own way, and
        PyTorch would take a wrong-sized patch without a word)."""
        missing = sorted(set(self.input_names) - set(inputs))
        unknown = sorted(set(inputs) - set(self.input_names))
        if missing or unknown:
            what = "; ".join(x for x in (f"missing inputs {missing}" if missing else "",
                                         f"unknown inputs {unknown}" if unknown else "") if x)
            raise EngineError(f"{self.graph}: {what}; it takes {self.expected()}")
        wrong = []
        batches = set()
        for name in self.input_names:
            shape = tuple(np.shape(inputs[name]))
            want = self.input_shapes.get(name)
            if shape:
                batches.add(shape[0])
            if want is not None and (len(shape) != len(want) or any(w is not None and w != d
                                                                    for w, d in zip(want, shape))):
                wrong.append(f"{name} {shape}")
        if wrong:
            raise EngineError(f"{self.graph}: wrong input shape {', '.join(wrong)}; it takes {self.expected()}")
        if len(batches) != 1 or min(batches) < 1:
            sizes = {n: tuple(np.shape(inputs[n]))[:1] for n in self.input_names}
            raise EngineError(f"{self.graph}: every input needs the same batch size, at least 1 (got {sizes}); "
                              f"it takes {self.expected()}")

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
    from engines.bundle import load_bundle

    try:
        card = load_bundle(onnx_path.parent).card.raw
    except BundleError:
        return False
    return bool(card.get("inference", {}).get("fp16", False))


def _verified(path: Path) -> VerifiedFile:
    """The file's bytes as its model card's SHA-256 lists them; an EngineError otherwise."""
    try:
        return read_verified(path)
    except BundleError as exc:
        raise EngineError(str(exc)) from None


def _graph_io(onnx: VerifiedFile) -> GraphIO:
    try:
        return read_io(onnx.data)
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's DecodeError and others
        raise EngineError(f"{onnx.path}: not a readable ONNX network ({type(exc).__name__}: {exc}); reinstall the "
                          f"bundle or rerun the training that wrote it") from None


def _choose(backend: str, options: EngineOptions) -> str:
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    avail = available_backends(options)
    if backend == "auto":
        auto = [b for b in AUTO_ORDER if b in avail]
        if not auto:
            raise EngineError("no inference backend is available: install onnxruntime")
        return auto[0]
    if backend not in avail:
        raise EngineError(f"backend {backend} is not available here (available: {avail or 'none'}): "
                          f"it {_why_unavailable(backend)}")
    return backend


def resolve_precision(backend: str, options: EngineOptions, fp16_allowed: bool) -> str:
    """fp16 only on a GPU backend and only where the card allows it; an explicit fp16 that the card
    forbids is an error (the card's authors measured that it changes answers). Not for ``triton``: there the
    server's configuration decides, and load_graph reports what it says (_served_precision)."""
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
    """One network: ``onnx_path`` names the ONNX file; other backends find their files beside it.

    Every file is checked against its model card's SHA-256 (engines.bundle.read_verified) and the runtime gets
    the checked bytes. ``threads`` is the caller's default share; ``[engines] threads`` overrides it."""
    path = Path(onnx_path)
    options = options or current()
    if not path.is_file():
        raise EngineError(f"model file {path} not found")
    chosen = _choose(backend, options)
    onnx = _verified(path)
    io = _graph_io(onnx)
    precision = "" if chosen == "triton" else resolve_precision(chosen, options, card_allows_fp16(path))
    try:
        session, device = _open(chosen, onnx, io.inputs, precision, options, threads, triton_model)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library has its own errors; the operator needs one message
        raise EngineError(f"backend {chosen} could not load {path.name}: {exc}") from exc
    if chosen == "triton":
        precision = _served_precision(session, options)
    log.info("%s/%s: backend %s (asked for %s), device %s, precision %s", path.parent.name, path.stem, chosen,
             backend, device, precision)
    return Engine(graph=path.stem, backend=chosen, device=device, precision=precision,
                  input_names=tuple(io.inputs), output_names=tuple(io.outputs), _session=session,
                  input_shapes=dict(io.inputs))


def _served_precision(session: object, options: EngineOptions) -> str:
    """What the Triton server's configuration runs (TensorRT FP16 where the export asked for it); a fixed
    ``[engines] precision`` it does not match is an error, as on the local backends."""
    served = str(getattr(session, "precision", "fp32"))
    if options.precision != "auto" and options.precision != served:
        close = getattr(session, "close", None)
        if close:
            close()
        raise EngineError(f"the Triton model {getattr(session, 'model', '?')} is served in {served} (its "
                          f"config.pbtxt), [engines] precision asks for {options.precision}: set precision "
                          f"\"auto\" or re-export with osteoscreen engines export-triton")
    return served


def _open(chosen: str, onnx: VerifiedFile, inputs: dict, precision: str, options: EngineOptions,
          threads: int | None, triton_model: str | None) -> tuple[object, str]:
    path = onnx.path
    if chosen in ("pytorch", "pytorch-cuda"):
        from engines.torch_backend import TorchScriptSession

        ts = path.with_suffix(".ts")
        if not ts.is_file():
            raise EngineError(f"backend {chosen} needs {ts.name} in the bundle (written by `osteoscreen train`)")
        device = "cuda" if chosen == "pytorch-cuda" else "cpu"
        # [engines] threads first; note torch.set_num_threads is process-wide (the last network loaded sets it)
        sess = TorchScriptSession(_verified(ts).data, device=device, fp16=precision == "fp16",
                                  threads=options.threads or threads)
        if tuple(sess.input_names) != tuple(inputs):
            raise EngineError(f"{ts.name} takes {sess.input_names}, the ONNX file {tuple(inputs)}")
        return sess, device
    if chosen.startswith("onnxruntime"):
        cuda = chosen == "onnxruntime-cuda"
        return ort_backend.OrtSession(onnx.data, cuda=cuda, options=options, threads=threads), \
            "cuda" if cuda else "cpu"
    if chosen == "tensorrt":
        from engines.tensorrt_backend import TensorRTSession

        return TensorRTSession(onnx, graph=f"{path.parent.name}__{path.stem}", fp16=precision == "fp16",
                               options=options, input_shapes=inputs), "cuda"
    from engines.triton_backend import TritonSession, model_name

    name = triton_model or model_name(path.parent.name, path.stem)
    return TritonSession(options.triton_url, options.triton_protocol, name, options.triton_timeout_s,
                         onnx_sha256=onnx.sha256), f"triton {options.triton_url}"


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
