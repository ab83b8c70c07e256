"""Input and output names and shapes of an ONNX network, read without starting a runtime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GraphIO:
    inputs: dict[str, tuple[int | None, ...]]   # None: a dynamic dimension (the batch)
    outputs: dict[str, tuple[int | None, ...]]


def read_io(onnx: Path | bytes) -> GraphIO:
    """From an ONNX file, or its bytes (as engines.bundle.read_verified checked them)."""
    import onnx as onnx_lib

    if isinstance(onnx, (bytes, bytearray)):
        model = onnx_lib.load_from_string(bytes(onnx))
    else:
        model = onnx_lib.load(str(onnx), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def shape(v) -> tuple[int | None, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)

    return GraphIO(inputs={i.name: shape(i) for i in model.graph.input if i.name not in init},
                   outputs={o.name: shape(o) for o in model.graph.output})
