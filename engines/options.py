"""Service-wide inference settings, set once per process from ``[engines]`` in the configuration.

Workers are separate processes: the service passes these options to each worker's
initializer, which calls :func:`configure` before loading any model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

PRECISIONS = ("auto", "fp32", "fp16")
GRAPH_OPTIMIZATION = ("disabled", "basic", "extended", "all")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "osteoscreen" / "engines"


@dataclass(frozen=True)
class EngineOptions:
    threads: int | None = None          # intra-op threads for CPU backends (None: the library's default)
    precision: str = "auto"             # auto: fp16 on TensorRT where the model card allows it, else fp32
    cache_dir: Path = field(default_factory=default_cache_dir)  # compiled TensorRT engines
    graph_optimization: str = "all"     # ONNX Runtime graph optimisation level
    opt_batch: int = 8                  # TensorRT profile: the batch it tunes for ...
    max_batch: int = 512                # ... and the largest it accepts (larger calls run in chunks)
    triton_url: str = ""                # host:port of a Triton server serving `engines export-triton`
    triton_protocol: str = "http"       # http | grpc
    triton_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION:
            raise ValueError(f"graph_optimization {self.graph_optimization!r}: choose one of {GRAPH_OPTIMIZATION}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= opt_batch ({self.opt_batch}) <= max_batch ({self.max_batch})")
        if self.triton_protocol not in ("http", "grpc"):
            raise ValueError(f"triton_protocol {self.triton_protocol!r}: choose http or grpc")


_current = EngineOptions()


def configure(options: EngineOptions | None = None, **changes: object) -> EngineOptions:
    """Set this process's defaults (a whole ``EngineOptions`` and/or single fields)."""
    global _current
    base = options if options is not None else _current
    _current = replace(base, **changes) if changes else base  # type: ignore[arg-type]
    return _current


def current() -> EngineOptions:
    return _current
