"""Inference backends behind one interface: named numpy arrays in, named numpy arrays out.

``auto`` picks the first available of: TensorRT (not built yet: see the engines
issue), ONNX Runtime CUDA, ONNX Runtime CPU. A forced backend that is not
available is an error at load time, never a silent fallback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("auto", "onnxruntime-cuda", "onnxruntime-cpu")


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


def available_backends() -> list[str]:
    prov = _ort_providers()
    out = []
    if "CUDAExecutionProvider" in prov:
        out.append("onnxruntime-cuda")
    if "CPUExecutionProvider" in prov:
        out.append("onnxruntime-cpu")
    return out


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
