"""The PyTorch reference: the bundle's TorchScript export of the trained network, eager.

This is the implementation every other backend is checked against (tests/test_engines.py,
``osteoscreen engines bench``). On CUDA it runs fp32, or fp16 under autocast where the
model card allows it.
"""
from __future__ import annotations

import io

import numpy as np


class TorchScriptSession:
    def __init__(self, ts: bytes, *, device: str, fp16: bool, threads: int | None) -> None:
        """``ts``: the TorchScript file's bytes, as engines.bundle.read_verified checked them. ``threads`` sets
        torch.set_num_threads, which is process-wide: the last network loaded on the CPU sets it for all."""
        import torch

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = torch.device(device)
        self.fp16 = fp16 and device == "cuda"
        if device == "cuda" and not self.fp16:
            # fp32 means fp32: TF32 would round convolution and matmul inputs to 10-bit mantissas
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.module = torch.jit.load(io.BytesIO(ts), map_location=self.device).eval()
        self.input_names = tuple(a.name for a in self.module.forward.schema.arguments[1:])

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            args = [torch.from_numpy(feeds[n]).to(self.device, non_blocking=True) for n in self.input_names]
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().cpu().numpy() for o in outs]

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
