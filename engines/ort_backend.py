"""ONNX Runtime sessions tuned for a service that shares its CPUs with DICOM ingest.

- intra-op threads from ``[engines] threads`` (it overrides the caller's per-network share), one inter-op
  thread;
- no spin-waiting between calls: a spinning pool would take cores from the listener
  while it waits for the next study;
- the graph optimisation level from configuration (default: all);
- on CUDA, IO binding: inputs are copied once, outputs stay on the device until read.
"""
from __future__ import annotations

import numpy as np

from engines.options import EngineOptions

_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def session_options(options: EngineOptions, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options.graph_optimization])
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    n = options.threads or threads  # the configured setting wins over the network's default share
    if n:
        opts.intra_op_num_threads = n
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtSession:
    """``run(output_names, feeds)`` over an ONNX Runtime session on the CPU or one CUDA device."""

    def __init__(self, onnx: bytes, *, cuda: bool, options: EngineOptions, threads: int | None) -> None:
        """``onnx``: the network's bytes, as engines.bundle.read_verified checked them."""
        import onnxruntime as ort

        # On CUDA: fp32 means fp32 (ORT enables TF32 by default: 5e-3 off the reference on the selector's Q,
        # measured on an H100), and a heuristic cuDNN algorithm choice: the exhaustive search re-runs whenever
        # the batch changes, which the selector's agents do at every step (400 ms per volume, measured).
        cuda_opts = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
        provs = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(onnx, sess_options=session_options(options, threads),
                                            providers=provs)
        self.cuda = cuda
        if cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError("ONNX Runtime did not start its CUDA provider (check the CUDA and cuDNN "
                               "libraries that onnxruntime-gpu needs)")

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.cuda:
            return self.session.run(names, feeds)
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for n in names:
            binding.bind_output(n, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
