"""Fixed CPU kernels for training, so that one seed rebuilds one bundle on any x86-64 CPU.

Libraries pick their vector kernels by the CPU they find: PyTorch's ATen (AVX2 or AVX-512 paths), MKL's
GEMM, oneDNN's convolutions, OpenBLAS, and numpy's SIMD dispatch. Those kernels round float sums in
different orders, and a few hundred SGD steps through ReLU and max-pool switches grow last-bit differences
into different weights: a fused bundle trained on an AMD EPYC missed its own metrics by 0.001-0.003 when
retrained on an Intel Xeon, and training in float64 did not help (the weights still moved by 0.014, found
with AVX2 kernels forced on the Xeon).

So training runs with the same kernels everywhere: ATen's unvectorised (``default``) kernels, MKL in its
conditional-numerical-reproducibility mode (``MKL_CBWR=COMPATIBLE,STRICT``), convolutions through ATen
rather than oneDNN, OpenBLAS's Nehalem kernels, numpy at its baseline, and fixed thread counts. Most of them
are read when a library loads, so the command re-runs itself in a child process with them set. The price is
speed: the fused training took 711 s here against 410 s unpinned; the networks are small.
"""
from __future__ import annotations

import os
import subprocess
import sys

MARK = "OSTEOSCREEN_PINNED_KERNELS"
THREADS = 2


def numpy_dispatch_targets() -> list[str]:
    """numpy's SIMD targets above its baseline, named as NPY_DISABLE_CPU_FEATURES takes them (numpy 1.x and 2.x)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return list(core._multiarray_umath.__cpu_dispatch__)


def pinned_env() -> dict[str, str]:
    """What the training child's environment gets on top of the caller's."""
    dispatch = " ".join(numpy_dispatch_targets())
    env = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", "OPENBLAS_CORETYPE": "Nehalem",
           "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "OPENBLAS_NUM_THREADS": str(THREADS), MARK: "1"}
    if dispatch:
        env["NPY_DISABLE_CPU_FEATURES"] = dispatch
    return env


def is_pinned() -> bool:
    return os.environ.get(MARK) == "1"


def rerun_pinned(argv: list[str]) -> int:
    """Run ``osteoscreen ARGV`` in a child process with the pinned kernels; its exit status.

    The child's standard output is passed on line by line through this process's ``sys.stdout`` (so a caller
    that captures it, a test or a wrapper, sees the result lines); its progress bars go straight to stderr."""
    env = {k: v for k, v in os.environ.items() if k != "NPY_ENABLE_CPU_FEATURES"}
    env.update(pinned_env())
    env["PYTHONUNBUFFERED"] = "1"  # its log lines as they come, not when the pipe's buffer fills
    with subprocess.Popen([sys.executable, "-m", "dicom_node.cli", *argv], env=env, stdout=subprocess.PIPE,
                          text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    return child.returncode


def apply_runtime_pins(log=None, command: str = "osteoscreen train") -> dict[str, object]:  # noqa: ANN001
    """What can be set after import (oneDNN off); returns what this process runs, for the card. Without the
    pinned environment (``run()`` called directly, not through ``command``) it says so through ``log``."""
    import torch

    torch.backends.mkldnn.enabled = False
    aten, cbwr = torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR", "")
    used = {"pinned": is_pinned() and aten == "DEFAULT" and cbwr.startswith("COMPATIBLE"), "aten": aten,
            "mkl_cbwr": cbwr, "onednn": torch.backends.mkldnn.enabled, "threads": torch.get_num_threads()}
    if log is not None and not used["pinned"]:
        log(f"note: CPU kernels not pinned (use `{command}`): the result reproduces on this CPU type only")
    return used
