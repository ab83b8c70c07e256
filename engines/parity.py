"""Do two backends give the same answers? Outputs compared against the PyTorch reference.

Tolerance per precision (|other - reference| <= atol + rtol * |reference|, every element):
- fp32: atol 1e-4, rtol 1e-4 — the same arithmetic in another order (kernels, fusion);
- fp16: atol 5e-2, rtol 2e-2 — 10-bit mantissas through a few layers; for the slice
  selector the action chosen (argmax of Q) is also compared, because that is what it decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.graph_io import GraphIO

TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 2e-2)}


@dataclass(frozen=True)
class Parity:
    graph: str
    backend: str
    precision: str
    inputs: str            # "random" | "real"
    max_abs: float
    worst_ratio: float     # max |diff| / (atol + rtol |ref|): <= 1 passes
    argmax_agreement: float | None

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0

    def line(self) -> str:
        agree = "" if self.argmax_agreement is None else f" argmax_agree={self.argmax_agreement:.3f}"
        return (f"{self.graph:<28} {self.backend:<17} {self.precision:<5} {self.inputs:<6} "
                f"max_abs={self.max_abs:.2e} tol_used={self.worst_ratio:.2f}{agree} {'ok' if self.ok else 'FAIL'}")


def random_inputs(io: GraphIO, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh standard-normal inputs (mask-like inputs as 0/1) in the graph's shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in io.inputs.items():
        full = (batch, *[d or 1 for d in shape[1:]])
        if "mask" in name or "present" in name:
            out[name] = (rng.random(full) < 0.7).astype(np.float32)
        else:
            out[name] = rng.standard_normal(full).astype(np.float32)
    return out


def compare(graph: str, backend: str, precision: str, kind: str, out: dict[str, np.ndarray],
            ref: dict[str, np.ndarray]) -> Parity:
    atol, rtol = TOLERANCE[precision]
    max_abs, worst, agree = 0.0, 0.0, None
    for name, r in ref.items():
        o = np.asarray(out[name], np.float64)
        r = np.asarray(r, np.float64)
        if o.shape != r.shape:
            raise AssertionError(f"{graph}/{name}: {backend} gave shape {o.shape}, reference {r.shape}")
        d = np.abs(o - r)
        max_abs = max(max_abs, float(d.max(initial=0.0)))
        worst = max(worst, float((d / (atol + rtol * np.abs(r))).max(initial=0.0)))
        if name == "q":
            agree = float((o.argmax(axis=1) == r.argmax(axis=1)).mean())
    return Parity(graph, backend, precision, kind, max_abs, worst, agree)
