"""Inference backends behind one interface: named numpy arrays in, named numpy arrays out.

``auto`` picks the first available of: TensorRT (not built yet: see the engines
issue), ONNX Runtime CUDA, ONNX Runtime CPU, PyTorch (TorchScript files in the
bundle, the reference implementation). A forced backend that is not available is
an error at load time, never a silent fallback.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("auto", "onnxruntime-cuda", "onnxruntime-cpu", "pytorch")


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
    _session: object

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise EngineError(f"{self.graph}: missing inputs {sorted(missing)}")
        feeds = {k: np.ascontiguousarray(inputs[k], dtype=np.float32) for k in self.input_names}
        outs = self._session.run(list(self.output_names), feeds)  # type: ignore[attr-defined]
        return dict(zip(self.output_names, outs))


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def _torch_available() -> bool:
    # find_spec, not import: importing torch costs ~4 s and is only needed if the backend is chosen
    return importlib.util.find_spec("torch") is not None


def available_backends() -> list[str]:
    prov = _ort_providers()
    out = []
    if "CUDAExecutionProvider" in prov:
        out.append("onnxruntime-cuda")
    if "CPUExecutionProvider" in prov:
        out.append("onnxruntime-cpu")
    if _torch_available():
        out.append("pytorch")
    return out


class _TorchScriptSession:
    """The subset of onnxruntime.InferenceSession.run that Engine uses, over a TorchScript module."""

    def __init__(self, path: Path, output_names: tuple[str, ...], threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.input_names = tuple(a.name for a in self.module.forward.schema.arguments[1:])
        self.output_names = output_names

    def run(self, names, feeds):
        with self._torch.no_grad():
            out = self.module(*(self._torch.from_numpy(feeds[n]) for n in self.input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in outs]


def _load_torchscript(onnx_path: Path, threads: int | None) -> Engine:
    ts = onnx_path.with_suffix(".ts")
    if not ts.is_file():
        raise EngineError(f"backend pytorch needs {ts.name} in the bundle (written by `osteoscreen train`)")
    output_names: tuple[str, ...] = ("output",)
    try:
        import onnx

        output_names = tuple(o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output)
    except Exception:  # noqa: BLE001 - names are a convenience; the module still runs
        pass
    sess = _TorchScriptSession(ts, output_names, threads)
    return Engine(graph=onnx_path.stem, backend="pytorch", device="cpu", precision="fp32",
                  input_names=sess.input_names, output_names=output_names, _session=sess)


def load_graph(onnx_path: str | Path, backend: str = "auto", *, threads: int | None = None) -> Engine:
    path = Path(onnx_path)
    if not path.is_file():
        raise EngineError(f"model file {path} not found")
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    avail = available_backends()
    chosen = avail[0] if backend == "auto" and avail else backend
    if chosen not in avail:
        raise EngineError(f"backend {backend} is not available here (available: {avail or 'none'}); "
                          "install onnxruntime (CPU) or onnxruntime-gpu with CUDA")
    if chosen == "pytorch":
        return _load_torchscript(path, threads)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if chosen == "onnxruntime-cuda" \
        else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    return Engine(
        graph=path.stem,
        backend=chosen,
        device="cuda" if chosen == "onnxruntime-cuda" else "cpu",
        precision="fp32",
        input_names=tuple(i.name for i in sess.get_inputs()),
        output_names=tuple(o.name for o in sess.get_outputs()),
        _session=sess,
    )


def load(bundle_dir: str | Path, backend: str = "auto", *, graph: str | None = None,
         threads: int | None = None) -> Engine:
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
    return load_graph(bundle_dir / f"{graph}.onnx", backend, threads=threads)
